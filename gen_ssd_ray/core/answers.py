"""Answer extraction from gold solutions and model responses (strings in, strings out).

Extraction only: deciding whether two answers are equal is math-verify's job (`gen_ssd_ray.verify`),
which runs in worker processes. Kept pure so the search core and unit tests can use it freely.
"""

from __future__ import annotations

import re

_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent."""
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


def extract_gold_answer(value: object) -> str | None:
    """The gold answer from GSM8K's `#### N` line, a `\\boxed{}` in a solution, or a bare value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return str(value)
    text = str(value).strip()
    if not text:
        return None
    if m := _GSM8K.findall(text):
        return _clean_number(m[-1].strip())
    if (boxed := last_boxed(text)) is not None:
        return boxed
    if "\n" not in text and len(text) <= 64:
        return text
    return None


def extract_final_answer(response: str) -> str | None:
    """The model's final answer: last `\\boxed{}`, else `#### N`, else "answer is N", else the last number."""
    if (boxed := last_boxed(response)) is not None:
        return boxed
    if m := _GSM8K.findall(response):
        return _clean_number(m[-1].strip())
    if m := _ANSWER_IS.findall(response):
        return _clean_number(m[-1])
    if m := _NUMBER.findall(response):
        return _clean_number(m[-1])
    return None
