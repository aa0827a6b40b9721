"""Score a task through a backend: per-subject and overall accuracy, unparseable answers, markdown and JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from dsserve.assets import demo_tasks
from dsserve.errors import ConfigError
from dsserve.eval.extract import extract_choice, extract_number
from dsserve.eval.tasks import Item

MODES = ("loglikelihood", "generate")


@dataclass
class SubjectScore:
    subject: str
    total: int = 0
    correct: int = 0
    unparseable: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class Report:
    task: str
    mode: str
    backend: str
    shots: int
    subjects: list[SubjectScore]
    records: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(s.total for s in self.subjects)

    @property
    def correct(self) -> int:
        return sum(s.correct for s in self.subjects)

    @property
    def unparseable(self) -> int:
        return sum(s.unparseable for s in self.subjects)

    @property
    def accuracy(self) -> float:
        """Over all items (micro average)."""
        return self.correct / self.total if self.total else 0.0

    @property
    def macro_accuracy(self) -> float:
        """The mean of the subjects' accuracies (C-Eval's and MMLU's headline average)."""
        return sum(s.accuracy for s in self.subjects) / len(self.subjects) if self.subjects else 0.0

    def markdown(self) -> str:
        lines = [f"**{self.task}**, {self.mode} scoring, {self.shots}-shot, via {self.backend}", "",
                 "| subject | n | correct | accuracy | unparseable |", "|---|---:|---:|---:|---:|"]
        for s in self.subjects:
            lines.append(f"| {s.subject} | {s.total} | {s.correct} | {s.accuracy:.2%} | {s.unparseable} |")
        lines.append(f"| **overall** | {self.total} | {self.correct} | {self.accuracy:.2%} | {self.unparseable} |")
        if len(self.subjects) > 1:
            lines.append(f"| subject average | | | {self.macro_accuracy:.2%} | |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "task": self.task, "mode": self.mode, "backend": self.backend, "shots": self.shots,
            "settings": self.settings, "accuracy": self.accuracy, "macro_accuracy": self.macro_accuracy,
            "total": self.total, "correct": self.correct, "unparseable": self.unparseable,
            "subjects": [{**asdict(s), "accuracy": s.accuracy} for s in self.subjects],
            "records": self.records,
        }


def default_mode(items: list[Item]) -> str:
    return "loglikelihood" if items and all(i.kind == "choice" for i in items) else "generate"


def default_max_tokens(task: str, chat: bool) -> int:
    """Generation budget: room for a reasoning model's chain of thought when chatting."""
    if task == "demo":
        return 384  # the demo model's longest worked answer is about 200 tokens
    if chat:
        return 4096
    return 16 if task in ("ceval", "mmlu") else 512


def evaluate(task: str, items: list[Item], backend, mode: str, shots: int, *, chat: bool = True,
             max_tokens: int | None = None, progress: Callable[[int], None] = lambda n: None) -> Report:
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}")
    if not items:
        raise ConfigError(f"no {task} items to score; check --data and --limit")
    max_tokens = max_tokens or default_max_tokens(task, chat)
    if mode == "loglikelihood":
        if any(i.kind != "choice" for i in items):
            raise ConfigError(f"{task} has free-form answers; score it with --mode generate")
        requests = [(i.prompt, c) for i in items for c in i.choices]
        scores = backend.loglikelihood(requests, progress)
        predictions, texts = [], []
        for n, item in enumerate(items):
            row = scores[n * len(item.choices) : (n + 1) * len(item.choices)]
            best = max(range(len(row)), key=row.__getitem__)
            predictions.append(item.choices[best].strip())
            texts.append(None)
    else:
        stop = ["Question:", "</s>", "<|im_end|>", "\n\n"] if task == "gsm8k" else ["\n"]
        generations = backend.generate([i.prompt for i in items], max_tokens, chat, None if chat else stop, progress)
        predictions = [_extract(item, g.content) for item, g in zip(items, generations)]
        texts = [g.content for g in generations]
    by_subject: dict[str, SubjectScore] = {}
    records = []
    for item, predicted, text in zip(items, predictions, texts):
        score = by_subject.setdefault(item.subject, SubjectScore(item.subject))
        score.total += 1
        score.correct += predicted == item.gold
        score.unparseable += predicted is None
        record = {"subject": item.subject, "gold": item.gold, "predicted": predicted, "correct": predicted == item.gold}
        if text is not None:
            record["content"] = text
        records.append(record)
    settings = {"max_tokens": max_tokens if mode == "generate" else None, "chat": chat if mode == "generate" else None}
    return Report(task, mode, backend.description, shots, [by_subject[k] for k in sorted(by_subject)], records, settings)


def _extract(item: Item, content: str | None) -> str | None:
    if item.kind == "choice":
        return extract_choice(content)
    if item.kind == "number":
        return extract_number(content)
    return demo_tasks.extract_answer(content)
