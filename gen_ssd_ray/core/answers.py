"""Answer extraction from gold solutions and model responses (strings in, strings out).

Extraction only: deciding whether two answers are equal is math-verify's job (`gen_ssd_ray.common.verify`),
which runs in worker processes. Kept pure so the search core and unit tests can use it freely.
"""

from __future__ import annotations

import decimal
import math
import numbers
import re
import string

# `#### N` on one line: [ \t] (not \s) so a bare "####" never captures the next line.
_GSM8K = re.compile(r"####[ \t]*(\S.*?)[ \t]*$", re.MULTILINE)
_BARE_MAX = 64  # the longest bare (unmarked, one-line) gold answer taken as is
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
    """The gold answer from GSM8K's `#### N` line, a `\\boxed{}` in a solution, or a bare value; None
    for junk (`parse_gold_answer` says what is wrong)."""
    return parse_gold_answer(value)[0]


def parse_gold_answer(value: object) -> tuple[str | None, str | None]:
    """`(answer, None)`, or `(None, what is wrong)` for a value that is no gold answer.

    Accepted: text (a `#### N` line, else the last `\\boxed{}`, else a short one-line value; see
    `_gold_from_text`) and numbers, as canonical strings: an integer (or an integral float/Decimal) in
    plain decimal ("7", never "7.0" or "1e+20"), any other finite float as its shortest round-trip repr
    ("2.5"), any other finite Decimal in plain notation. Everything else is junk with a reason: None
    ("missing"), bool, NaN and infinities, bytes, lists, dicts and other containers or objects, text that
    UTF-8 cannot encode (lone surrogates), empty text, a `####` or `\\boxed{}` with nothing usable in it,
    an answer with no digit or letter in it ("?", "$"), and text with no final answer in it.
    """
    if value is None:
        return None, "missing (null or absent)"
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's bool is no int either
        return None, f"a boolean ({value}), not an answer"
    if isinstance(value, numbers.Number):
        return _canonical_number(value)
    if isinstance(value, (bytes, bytearray)):
        return None, "bytes, not text"
    if not isinstance(value, str):
        return None, f"a {type(value).__name__}, not text or a number: {shorten(value)}"
    if (bad := unencodable(value)) is not None:
        return None, bad
    return _gold_from_text(value)


def canonical_number(value: numbers.Number) -> str | None:
    """The canonical string of a finite real number (see `parse_gold_answer`); None for NaN, an
    infinity or a complex number."""
    return _canonical_number(value)[0]


def _canonical_number(value: numbers.Number) -> tuple[str | None, str | None]:
    if isinstance(value, numbers.Integral):
        return str(int(value)), None
    if isinstance(value, decimal.Decimal):
        if value.is_nan():
            return None, "NaN"
        if value.is_infinite():
            return None, "infinite"
        if value == value.to_integral_value():
            return str(int(value)), None
        return format(value.normalize(), "f"), None
    if not isinstance(value, numbers.Real):
        return None, f"a {type(value).__name__} number, not a real one"
    x = float(value)
    if math.isnan(x):
        return None, "NaN"
    if math.isinf(x):
        return None, "infinite"
    return (str(int(x)) if x.is_integer() else repr(x)), None


def unencodable(text: str) -> str | None:
    """What is wrong with `text` if UTF-8 (so Parquet) cannot encode it (a lone surrogate, as
    `json.loads` makes from "\\ud800"); None if it can. The reason shows the text escaped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"not valid Unicode text (lone surrogate {text[e.start]!r} at position {e.start}; "
            f"UTF-8 cannot encode it): {shorten(text)}"
        )
    return None


def shorten(value: object, limit: int = 80) -> str:
    """`value` for a message: its repr cut to `limit` characters, every character that UTF-8 cannot
    encode escaped (so a message quoting bad data can itself be written)."""
    try:
        text = repr(value)
    except RecursionError:  # a structure nested deeper than repr goes
        text = f"<a {type(value).__name__} nested too deeply to show>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _gold_from_text(value: str) -> tuple[str | None, str | None]:
    text = value.strip()
    if not text:
        return None, "empty text"
    if "####" in text:  # a `####` marker: what follows it on its line is the answer, or nothing is
        hashed = _after_hashes(text)
        if hashed is None or not _has_content(hashed):
            return None, f"a '####' line with no answer after it: {shorten(value)}"
        return hashed, None
    if "\\boxed{" in text or "\\fbox{" in text:
        boxed = last_boxed(text)
        if boxed is None:
            return None, f"an unbalanced \\boxed{{ (no closing brace): {shorten(value)}"
        if not _has_content(boxed):
            return None, f"an empty \\boxed{{}}: {shorten(value)}"
        return boxed, None
    if "\n" in text or len(text) > _BARE_MAX:
        return None, (
            "no final answer found (no '#### N' line, no \\boxed{}, and not a one-line value of at most "
            f"{_BARE_MAX} characters): {shorten(value)}"
        )
    if not _has_content(text):
        return None, f"no digit or letter in it: {shorten(value)}"
    return text, None


def _has_content(answer: str) -> bool:
    """Whether an extracted answer holds anything but ASCII punctuation and spaces ("?", "$", "." do not)."""
    return any(not (c.isspace() or c in string.punctuation) for c in answer)


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
