"""The demo model's task generator and training script: answers are right, runs are reproducible."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsserve.assets import demo_tasks

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_demo_model.py"


def test_problems_are_correct_and_seeded():
    problems = demo_tasks.generate(7, 400)
    assert {p.task for p in problems} == set(demo_tasks.TASKS) and {p.lang for p in problems} == {"en", "zh"}
    for p in problems:
        numbers = re.findall(r"\d+(?:\.\d+)?", p.question)
        if p.task == "add":
            assert int(p.answer) == int(numbers[0]) + int(numbers[1])
        elif p.task == "sub":
            assert int(p.answer) == int(numbers[0]) - int(numbers[1])
        elif p.task == "compare":
            assert float(p.answer) == max(float(numbers[0]), float(numbers[1]))
        else:
            letter, word = (re.findall(r"'(\w+)'", p.question) + [None])[:2]
            if p.lang == "zh":
                word, letter = letter, word
            assert int(p.answer) == word.count(letter)
        assert demo_tasks.extract_answer(p.completion().split("</think>")[1]) == p.answer
    assert demo_tasks.generate(7, 400) == problems


def test_training_twice_gives_the_same_loss(tmp_path):
    losses = []
    for run in range(2):
        out = subprocess.run([sys.executable, str(SCRIPT), "--steps", "3", "--batch-size", "4", "--eval", "0",
                              "--heldout", "8", "--out", str(tmp_path / f"run{run}")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        losses.append(re.search(r"final loss (\S+)", out.stdout).group(1))
    assert losses[0] == losses[1]
    assert (tmp_path / "run0" / "model.safetensors").exists() and (tmp_path / "run0" / "heldout.jsonl").exists()
    from dsserve import LLM, SamplingParams

    out = LLM(tmp_path / "run0", num_kv_blocks=64).chat([{"role": "user", "content": "What is 12 + 34?"}],
                                                         SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


def test_training_attention_equals_transformers_eager():
    """The script trains with SDPA's fused causal kernel; the saved model is run with HF's and dsserve's own
    attention, so the two must agree."""
    import importlib.util

    import torch
    from transformers import AttentionInterface, DeepseekV3ForCausalLM

    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    AttentionInterface.register("dsserve_train_causal", script._causal_attention)
    torch.manual_seed(0)
    config, fused_config = script.model_config(262), script.model_config(262)
    config._attn_implementation, fused_config._attn_implementation = "eager", "dsserve_train_causal"
    eager, fused = DeepseekV3ForCausalLM(config).eval(), DeepseekV3ForCausalLM(fused_config).eval()
    fused.load_state_dict(eager.state_dict())
    ids = torch.randint(2, 262, (3, 40))
    with torch.no_grad():
        assert torch.allclose(eager(input_ids=ids).logits, fused(input_ids=ids).logits, atol=1e-5)
