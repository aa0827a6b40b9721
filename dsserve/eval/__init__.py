"""`dsserve eval`: C-Eval, MMLU, GSM8K and the demo task from local files, scored by log-likelihood or by
generation with answer extraction (reasoning models: `content` only), in-process or against any endpoint."""

from dsserve.eval.backends import HTTPBackend, InProcessBackend
from dsserve.eval.runner import Report, evaluate
from dsserve.eval.tasks import TASKS, load

__all__ = ["HTTPBackend", "InProcessBackend", "Report", "TASKS", "evaluate", "load"]
