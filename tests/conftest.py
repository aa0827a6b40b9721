import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(name) -> folder of a tiny random transformers checkpoint, built once per session."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tiny_models.BUILDERS[name](tmp_path_factory.mktemp(name))
        return built[name]

    return get


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_r1(tmp_path_factory) -> Path:
    """dsserve's own tiny random DeepSeek-V3 checkpoint with an R1-style byte-level tokenizer and chat template."""
    from dsserve.assets.tiny_random import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-r1")


@pytest.fixture(scope="session")
def tiny_llm(tiny_r1):
    from dsserve import LLM

    return LLM(tiny_r1, num_kv_blocks=512, max_model_len=1024)
