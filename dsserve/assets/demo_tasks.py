"""The demo model's synthetic tasks, in R1's answer format: `<think>\\n...worked steps...\\n</think>\\n\\nanswer`.

Multi-digit addition and subtraction with the carries written out, comparing decimals ("which is larger,
9.11 or 9.8?"), counting a letter in a word; prompts in English and Chinese. The same generator makes the
training data (one seed) and the held-out evaluation set (another seed).
"""

from __future__ import annotations

import random

from dataclasses import asdict, dataclass

TASKS = ("add", "sub", "compare", "count")


@dataclass(frozen=True)
class Problem:
    task: str  # one of TASKS
    lang: str  # "en" or "zh"
    question: str  # the user's message
    reasoning: str  # the worked steps (inside <think>)
    answer: str  # the exact expected answer

    def completion(self) -> str:
        """What the model writes after the template's `<think>\\n`."""
        return f"{self.reasoning}\n</think>\n\n{self.answer}"

    def to_dict(self) -> dict:
        return asdict(self)


# Training mix: counting letters takes a tiny model the most examples, addition the fewest.
TRAIN_WEIGHTS = {"add": 0.15, "sub": 0.25, "compare": 0.2, "count": 0.4}


def generate(seed: int, count: int, weights: dict[str, float] | None = None) -> list[Problem]:
    """`count` problems; tasks in turn (an even held-out set), or drawn with `weights` (training)."""
    rng = random.Random(seed)
    makers = {"add": _addition, "sub": _subtraction, "compare": _compare, "count": _count}
    problems = []
    for i in range(count):
        task = rng.choices(TASKS, [weights[t] for t in TASKS])[0] if weights else TASKS[i % len(TASKS)]
        problems.append(makers[task](rng, rng.choice(("en", "zh"))))
    return problems


def extract_answer(content: str | None) -> str | None:
    """The answer as the demo model states it: the last line of the content, stripped."""
    if not content:
        return None
    lines = [line.strip() for line in content.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def _addition(rng: random.Random, lang: str) -> Problem:
    """Column by column from the right; each line carries the result so far, so the answer is the last one."""
    a, b = _operand(rng), _operand(rng)
    q = f"What is {a} + {b}?" if lang == "en" else f"计算 {a} + {b} 等于多少？"
    steps, carry, result = [], 0, ""
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        expr = f"{x}+{y}" + (f"+{carry}" if carry else "")
        carry, digit = divmod(total, 10)
        result = f"{digit}{result}"
        steps.append(f"{expr}={total}, carry {carry}, so far {result}")
    if carry:
        result = f"{carry}{result}"
        steps.append(f"carry {carry} in front: {result}")
    assert int(result) == a + b
    return Problem("add", lang, q, "\n".join(steps), result)


def _subtraction(rng: random.Random, lang: str) -> Problem:
    """Column by column from the right. A borrowed 1 is taken off first and the result compared with the digit
    below, so every decision is written out; each line carries the result so far."""
    a, b = sorted((_operand(rng), _operand(rng)), reverse=True)
    q = f"What is {a} - {b}?" if lang == "en" else f"计算 {a} - {b} 等于多少？"
    steps, borrow, result = [], 0, ""
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(len(da)):
        x = int(da[i])
        y = int(db[i]) if i < len(db) else 0
        top = x - borrow
        line = f"{x}-1={top}, " if borrow else ""
        if top < y:
            digit, borrow = top + 10 - y, 1
            line += f"{top}<{y}, borrow 1: {top + 10}-{y}={digit}"
        else:
            digit, borrow = top - y, 0
            line += f"{top}>={y}: {top}-{y}={digit}"
        result = f"{digit}{result}"
        steps.append(f"{line}, so far {result}")
    answer = str(int(result))
    if answer != result:
        steps.append(f"drop leading zeros: {answer}")
    assert int(answer) == a - b
    return Problem("sub", lang, q, "\n".join(steps), answer)


def _compare(rng: random.Random, lang: str) -> Problem:
    """Both numbers padded to the same shape, then their digits compared from the left.

    Each line drops the leading digit of both digit strings (as counting drops letters), so the digits to
    compare always open the line, and a whole part like 9 against 12 becomes 09 against 12.
    """
    whole = rng.randint(0, 20)
    x = f"{whole if rng.random() < 0.4 else rng.randint(0, 20)}.{_fraction(rng)}"
    y = f"{whole}.{_fraction(rng)}"
    while float(x) == float(y):
        y = f"{whole}.{rng.randint(1, 9)}"
    if rng.random() < 0.5:
        x, y = y, x
    q = (f"Which is larger, {x} or {y}?" if lang == "en" else f"{x} 和 {y} 哪个大？")
    width = max(len(x.split(".")[1]), len(y.split(".")[1]))
    px, py = _pad(x, width), _pad(y, width)
    steps = [f"align: {px} and {py}"]
    dx, dy = px.replace(".", ""), py.replace(".", "")
    for i in range(len(dx)):
        cx, cy = dx[i], dy[i]
        steps.append(f"{dx[i:]} vs {dy[i:]}: {cx} {'>' if cx > cy else '<' if cx < cy else '='} {cy}")
        if cx != cy:
            break
    larger = x if float(x) > float(y) else y
    assert (dx > dy) == (larger == x)
    steps.append(f"so {larger} is larger")
    return Problem("compare", lang, q, "\n".join(steps), larger)


def _count(rng: random.Random, lang: str) -> Problem:
    """One line per letter: the rest of the word, its first letter, + (a match) or . (not), the count so far.

    Each line copies the line above minus one letter, so the letter to check is always at hand.
    """
    letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
    length = rng.randint(3, 7)
    word = "".join(letter if rng.random() < 0.3 else rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))
    q = (f"How many times does the letter '{letter}' appear in '{word}'?" if lang == "en"
         else f"单词 '{word}' 中有几个字母 '{letter}'？")
    steps, seen = [], 0
    for i, ch in enumerate(word):
        seen += ch == letter
        steps.append(f"{word[i:]}: {ch} {'+' if ch == letter else '.'} {seen}")
    steps.append(f"so '{letter}' appears {seen} times")
    assert seen == word.count(letter)
    return Problem("count", lang, q, "\n".join(steps), str(seen))


def _fraction(rng: random.Random) -> str:
    """One or two decimal digits without a trailing zero (2.20 and 2.2 would make the answer ambiguous)."""
    if rng.random() < 0.5:
        return str(rng.randint(1, 9))
    return str(rng.choice([n for n in range(1, 100) if n % 10]))


def _operand(rng: random.Random) -> int:
    digits = rng.randint(2, 3)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _pad(number: str, width: int) -> str:
    """Two-digit whole part, `width` decimal digits: 9.8 -> 09.80 at width 2."""
    whole, frac = number.split(".")
    return f"{whole.zfill(2)}.{frac.ljust(width, '0')}"


