"""Files that ship with dsserve: DeepSeek-R1's chat template and a generator of tiny random checkpoints."""

from pathlib import Path

DEMO_SERVED_NAME = "dsserve-demo-r1"


def demo_model_dir() -> Path:
    """The demo model that ships inside the package (scripts/train_demo_model.py writes it)."""
    return Path(__file__).parent / "demo-r1"
