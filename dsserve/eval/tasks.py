"""Evaluation sets read from their official file layouts on local disk (nothing is downloaded).

- C-Eval: `dev/<subject>_dev.csv` (few-shot examples) and `val/<subject>_val.csv` (scored), header
  `id,question,A,B,C,D,answer[,explanation]`; Chinese subject names from `subject_mapping.json` when present.
- MMLU: `dev/<subject>_dev.csv` and `test/<subject>_test.csv` (or `val/`), no header:
  `question,A,B,C,D,answer`.
- GSM8K: a JSONL file (`{"question", "answer": "...#### 42"}`), or a folder with `test.jsonl`; few-shot
  examples are the first of `train.jsonl` beside it.
- demo: the demo model's held-out set (`heldout.jsonl`: question, answer, task).

Prompts follow lm-evaluation-harness: a subject description, `shots` solved examples, then the question;
multiple-choice continuations are " A" .. " D" after `答案：` / `Answer:`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from dsserve.errors import ConfigError
from dsserve.eval.extract import normalize_number

TASKS = ("ceval", "mmlu", "gsm8k", "demo")
LETTERS = "ABCD"


@dataclass(frozen=True)
class Item:
    subject: str
    prompt: str  # everything before the answer (shots included)
    gold: str  # a letter, a normalised number, or the exact demo answer
    kind: str  # "choice", "number" or "exact"
    choices: tuple[str, ...] = ()  # continuations scored in log-likelihood mode


def load(task: str, data: str | Path, shots: int, split: str | None = None, limit: int | None = None) -> list[Item]:
    """All items of `task` in a fixed order (subjects sorted, file order within a subject)."""
    path = Path(data).expanduser()
    if not path.exists():
        raise ConfigError(f"evaluation data {path} does not exist; point --data at the {task} files")
    if task == "ceval":
        return _multiple_choice(path, split or "val", shots, limit, header=True, chinese=True)
    if task == "mmlu":
        return _multiple_choice(path, split or "test", shots, limit, header=False, chinese=False)
    if task == "gsm8k":
        return _gsm8k(path, shots, limit)
    if task == "demo":
        return _demo(path, limit)
    raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _multiple_choice(root: Path, split: str, shots: int, limit: int | None, header: bool, chinese: bool) -> list[Item]:
    if (root / "data").is_dir() and not (root / split).is_dir():
        root = root / "data"  # MMLU's tarball unpacks to data/{dev,val,test}
    folder = root / split
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise ConfigError(f"no {folder}/<subject>_{split}.csv files; --data must be the folder that holds "
                          f"dev/ and {split}/ (the official layout)")
    names = _ceval_names(root) if chinese else {}
    items = []
    for file in files:
        subject = file.name[: -len(f"_{split}.csv")]
        rows = _read_choice_csv(file, header)
        examples = _read_choice_csv(root / "dev" / f"{subject}_dev.csv", header)[:shots] if shots else []
        if shots and len(examples) < shots:
            raise ConfigError(f"{shots}-shot needs {shots} examples in {root}/dev/{subject}_dev.csv; "
                              f"it has {len(examples)} (use --shots {len(examples)})")
        title = names.get(subject, subject.replace("_", " "))
        head = (f"以下是中国关于{title}考试的单项选择题，请选出其中的正确答案。\n\n" if chinese
                else f"The following are multiple choice questions (with answers) about {title}.\n\n")
        cue = "答案：" if chinese else "Answer:"
        shot_text = "".join(_format_choice(r, cue) + f" {r['answer']}\n\n" for r in examples)
        for row in rows[:limit] if limit else rows:
            items.append(Item(subject, head + shot_text + _format_choice(row, cue), row["answer"], "choice",
                              tuple(f" {letter}" for letter in LETTERS)))
    return items


def _read_choice_csv(path: Path, header: bool) -> list[dict[str, str]]:
    if not path.exists():
        raise ConfigError(f"{path} is missing")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if header:
        columns = [c.strip() for c in rows[0]]
        missing = {"question", *LETTERS, "answer"} - set(columns)
        if missing:
            raise ConfigError(f"{path}: columns {sorted(missing)} missing; C-Eval files have "
                              "id,question,A,B,C,D,answer")
        rows = [dict(zip(columns, r)) for r in rows[1:]]
    else:
        bad = [i for i, r in enumerate(rows) if len(r) < 6]
        if bad:
            raise ConfigError(f"{path} line {bad[0] + 1}: MMLU rows have 6 fields (question,A,B,C,D,answer)")
        rows = [dict(zip(("question", *LETTERS, "answer"), r)) for r in rows]
    for i, r in enumerate(rows):
        r["answer"] = r["answer"].strip().upper()
        if r["answer"] not in LETTERS:
            raise ConfigError(f"{path} row {i + 1}: answer {r['answer']!r} is not one of A, B, C, D")
    return rows


def _format_choice(row: dict[str, str], cue: str) -> str:
    options = "".join(f"\n{letter}. {row[letter].strip()}" for letter in LETTERS)
    return f"{row['question'].strip()}{options}\n{cue}"


def _ceval_names(root: Path) -> dict[str, str]:
    for candidate in (root / "subject_mapping.json", root.parent / "subject_mapping.json"):
        if candidate.exists():
            mapping = json.loads(candidate.read_text(encoding="utf-8"))
            return {k: v[1] for k, v in mapping.items() if isinstance(v, list) and len(v) > 1}
    return {}


def _gsm8k(path: Path, shots: int, limit: int | None) -> list[Item]:
    test = path / "test.jsonl" if path.is_dir() else path
    train = test.parent / "train.jsonl"
    rows = _read_jsonl(test, ("question", "answer"))
    examples = _read_jsonl(train, ("question", "answer"))[:shots] if shots and train.exists() else []
    if shots and len(examples) < shots:
        raise ConfigError(f"{shots}-shot GSM8K takes its examples from {train}, which is missing or short; "
                          "add it or pass --shots 0")
    shot_text = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in examples)
    items = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        if "####" not in row["answer"]:
            raise ConfigError(f"{test} line {i + 1}: the answer has no '#### <number>' (GSM8K's format)")
        gold = normalize_number(row["answer"].rsplit("####", 1)[1])
        items.append(Item("gsm8k", shot_text + f"Question: {row['question']}\nAnswer:", gold or "", "number"))
    return items


def _demo(path: Path, limit: int | None) -> list[Item]:
    file = path / "heldout.jsonl" if path.is_dir() else path
    rows = _read_jsonl(file, ("question", "answer"))
    return [Item(r.get("task", "demo"), r["question"], r["answer"], "exact") for r in (rows[:limit] if limit else rows)]


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    if not path.exists():
        raise ConfigError(f"{path} is missing")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {n} is not JSON: {e}") from None
        missing = [f for f in fields if f not in row]
        if missing:
            raise ConfigError(f"{path} line {n} lacks {missing}")
        rows.append(row)
    return rows
