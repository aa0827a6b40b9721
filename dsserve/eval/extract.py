"""Answer extraction from generated text: choice letters (Chinese and English phrasings) and numbers.

Reasoning models are scored on their answer only: text up to a closing `</think>` is dropped before
extraction, and the HTTP client reads `content`, never `reasoning_content`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_LETTER = r"[\(（\[【]?\s*([{letters}])\s*[\)）\]】]?"

# Most specific first; within a pattern the last match wins (a model restating its final choice).
_CHOICE_PATTERNS = [
    r"\\boxed\{{\s*(?:\\text\{{)?([{letters}])",
    r"答案\s*(?:应该|應該|应当)?\s*(?:是|为|為|选|選)?\s*[:：]?\s*" + _LETTER,
    r"(?:正确|正確)(?:答案|选项|選項)\s*(?:是|为|為)?\s*[:：]?\s*" + _LETTER,
    r"(?:选|選)(?:择|擇)?(?:项|項)?\s*[:：]?\s*" + _LETTER,
    r"[Tt]he (?:correct |best |final )?(?:answer|option|choice) (?:is|would be|should be)\s*[:：]?\s*" + _LETTER,
    r"[Aa]nswer\s*[:：]\s*" + _LETTER,
]
_NUMBER = r"-?[\d,]*\.?\d+"
_NUMBER_PATTERNS = [
    rf"####\s*\$?\s*({_NUMBER})",
    r"\\boxed\{\s*\$?\s*(" + _NUMBER + r")",
    rf"[Tt]he (?:final )?answer is\s*[:：]?\s*\$?\s*({_NUMBER})",
    rf"答案\s*(?:是|为|為)?\s*[:：]?\s*\$?\s*({_NUMBER})",
]


def answer_text(text: str | None) -> str:
    """The part of an output that states the answer: what follows `</think>` when the output has one."""
    if not text:
        return ""
    return text.rsplit("</think>", 1)[1] if "</think>" in text else text


def extract_choice(text: str | None, letters: str = "ABCD") -> str | None:
    """The chosen letter, or None when the text names none unambiguously."""
    text = answer_text(text).strip()
    if not text:
        return None
    for pattern in _CHOICE_PATTERNS:
        found = re.findall(pattern.format(letters=letters), text)
        if found:
            return found[-1]
    alone = re.fullmatch(r"[\(（\[]?\s*([{l}])\s*[\)）\]]?[\.。:：]?".format(l=letters), text)
    if alone:
        return alone.group(1)
    opening = re.match(r"^[\(（\[]?([{l}])(?:[\)）\]\.。:：,，\s]|$)".format(l=letters), text)
    if opening:
        return opening.group(1)
    standalone = set(re.findall(r"(?<![A-Za-z])([{l}])(?![A-Za-z])".format(l=letters), text))
    return standalone.pop() if len(standalone) == 1 else None


def extract_number(text: str | None) -> str | None:
    """The final numeric answer, normalised (no thousands separators, no trailing zeros), or None."""
    text = answer_text(text)
    for pattern in _NUMBER_PATTERNS:
        found = re.findall(pattern, text)
        if found:
            return normalize_number(found[-1])
    numbers = re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None


def normalize_number(value: str) -> str | None:
    cleaned = value.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        number = Decimal(cleaned)
    except InvalidOperation:
        return None
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")
