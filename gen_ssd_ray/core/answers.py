"""Answer extraction from gold solutions and model responses (strings in, strings out).

Extraction only: deciding whether two answers are equal is math-verify's job (`gen_ssd_ray.common.verify`),
which runs in worker processes. Kept pure so the search core and unit tests can use it freely.
"""

from __future__ import annotations

import math
import re

# `#### N` on one line: [ \t] (not \s) so a bare "####" never captures the next line.
_GSM8K = re.compile(r"####[ \t]*(\S.*?)[ \t]*$", re.MULTILINE)
_ANSWER_IS = re.compile(r"answer\s*(?:is\s*:?|:)\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# "$72", "72 dollars", "72." after ####: the number alone (math-verify would read units as symbols).
_NUMBER_WITH_UNITS = re.compile(r"^\$?\s*(-?\d[\d,]*(?:\.\d+)?)\s*(?:[A-Za-z][A-Za-z ]*)?\.?$")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent or
    unbalanced. May be "" for an empty box; the extractors treat that as no answer."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def _clean_number(s: str) -> str:
    return s.replace(",", "").rstrip(".")


def _after_hashes(text: str) -> str | None:
    """The last `#### ...` value; a number followed only by words (units) is reduced to the number."""
    if not (m := _GSM8K.findall(text)):
        return None
    value = m[-1].strip()
    if n := _NUMBER_WITH_UNITS.match(value):
        return _clean_number(n.group(1))
    return value.rstrip(".") or None  # not a plain number: keep commas, e.g. "(1, 2)"


def extract_gold_answer(value: object) -> str | None:
    """The gold answer from GSM8K's `#### N` line, a `\\boxed{}` in a solution, or a bare value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(value) if math.isfinite(value) else None
    text = str(value).strip()
    if not text:
        return None
    if (hashed := _after_hashes(text)) is not None:
        return hashed
    if (boxed := last_boxed(text)) is not None:
        return boxed or None  # an empty box is no answer
    if "\n" not in text and len(text) <= 64:
        return text
    return None


def extract_final_answer(response: str) -> str | None:
    """The model's final answer: last `\\boxed{}`, else `#### N`, else "answer is N", else the last number."""
    if boxed := last_boxed(response):
        return boxed
    if (hashed := _after_hashes(response)) is not None:
        return hashed
    if m := _ANSWER_IS.findall(response):
        return _clean_number(m[-1])
    if m := _NUMBER.findall(response):
        return _clean_number(m[-1])
    return None
