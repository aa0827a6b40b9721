"""Train dsserve's built-in demo model: a tiny DeepSeek-V3-architecture reasoning model (MLA, a dense first layer
then MoE layers with shared and routed experts, YaRN rope) that answers in R1's format.

    python scripts/train_demo_model.py                      # writes dsserve/assets/demo-r1 (CPU, 2 cores, < 30 min)
    python scripts/train_demo_model.py --steps 20 --out /tmp/x --eval 0   # a quick smoke run

Deterministic: fixed seeds, one thread order; running it twice with the same seed gives the same final loss.
It also writes the held-out evaluation set (another seed) as heldout.jsonl beside the model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsserve.assets import demo_tasks  # noqa: E402
from dsserve.assets.tiny_random import write_tokenizer  # noqa: E402

TRAIN_SEED_OFFSET = 0
HELDOUT_SEED = 424242


def model_config(vocab_size: int):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=48,
        qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=1.0,
        norm_topk_prob=True, max_position_embeddings=1024, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False, initializer_range=0.02,
    )


def encode(tokenizer, problem: demo_tasks.Problem) -> tuple[list[int], int]:
    """Token ids of prompt + completion + EOS, and where the completion starts (the loss covers only it)."""
    prompt = tokenizer.encode_chat([{"role": "user", "content": problem.question}])
    completion = tokenizer.encode(problem.completion(), add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt + completion, len(prompt)


def batches(tokenizer, seed: int, batch_size: int):
    """Batches of problems drawn at random, padded on the right. (Sorting problems by length to save padding
    makes batches of alike problems, and a tiny model then learns far less from the same steps.)"""
    for step in itertools.count():
        problems = demo_tasks.generate(seed * 1_000_003 + step, batch_size, demo_tasks.TRAIN_WEIGHTS)
        encoded = [encode(tokenizer, p) for p in problems]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((batch_size, width), tokenizer.eos_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for i, (ids, start) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, start : len(ids)] = torch.tensor(ids[start:])
        yield input_ids, labels


def _causal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Training attention: SDPA's fused causal kernel (no mask tensor; padding sits on the right, after every
    real token, and is left out of the loss). MLA's value heads are narrower than its query/key heads, so
    values are zero-padded to the same width for the kernel and the padding is cut off again."""
    width, value_width = query.shape[-1], value.shape[-1]
    if value_width < width:
        value = torch.nn.functional.pad(value, (0, width - value_width))
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                           dropout_p=dropout)
    return out[..., :value_width].transpose(1, 2).contiguous(), None


def train(args) -> float:
    from transformers import AttentionInterface, DeepseekV3ForCausalLM

    from dsserve.engine.tokenizer import Tokenizer

    AttentionInterface.register("dsserve_train_causal", _causal_attention)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(args.device == "cpu")
    out = Path(args.out)
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    write_tokenizer(staging, model_max_length=1024)
    tokenizer = Tokenizer(staging)
    config = model_config(tokenizer.vocab_size)
    config._attn_implementation = "dsserve_train_causal"
    model = DeepseekV3ForCausalLM(config).to(args.device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    started = time.time()
    loss_value = float("nan")
    ema = None
    for step, (input_ids, labels) in zip(range(args.steps), batches(tokenizer, args.seed, args.batch_size)):
        lr = _learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(input_ids=input_ids.to(args.device), labels=labels.to(args.device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = loss.item()
        ema = loss_value if ema is None else 0.95 * ema + 0.05 * loss_value
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss_value:.4f}  avg {ema:.4f}  lr {lr:.2e}  {time.time() - started:6.0f}s",
                  flush=True)
    model.eval()
    model.config._attn_implementation = "sdpa"  # what loaders of the saved folder get
    model.to("cpu").save_pretrained(staging)
    (staging / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False, "max_new_tokens": 256}, indent=1))
    with open(staging / "heldout.jsonl", "w", encoding="utf-8") as f:
        for problem in demo_tasks.generate(HELDOUT_SEED, args.heldout):
            f.write(json.dumps(problem.to_dict(), ensure_ascii=False) + "\n")
    if out.exists():
        for old in out.iterdir():
            old.unlink()
        out.rmdir()
    staging.rename(out)
    print(f"final loss {loss_value:.6f}", flush=True)
    print(f"wrote {out} in {time.time() - started:.0f}s", flush=True)
    return loss_value


def _learning_rate(step: int, args) -> float:
    """Warm-up, a long constant phase, then a linear decay over the last `decay` share of the steps."""
    warm = min(1.0, (step + 1) / args.warmup)
    decay_start = int(args.steps * (1 - args.decay))
    if step < decay_start:
        return args.lr * warm
    return args.lr * max(0.02, 1 - (step - decay_start) / max(1, args.steps - decay_start))


def evaluate(model_dir: Path, count: int, show_failures: int = 0) -> float:
    from dsserve import LLM, SamplingParams
    from dsserve.reasoning import r1

    problems = [json.loads(line) for line in open(model_dir / "heldout.jsonl", encoding="utf-8")][:count]
    llm = LLM(model_dir, max_model_len=1024)
    outputs = llm.chat([[{"role": "user", "content": p["question"]}] for p in problems],
                       SamplingParams(temperature=0, max_tokens=400))
    correct = 0
    by_task: dict[str, list[int]] = {}
    shown: dict[str, int] = {}
    for p, o in zip(problems, outputs):
        reasoning, content = r1.split(o.outputs[0].text)
        ok = bool(reasoning) and demo_tasks.extract_answer(content) == p["answer"]
        correct += ok
        if not ok and shown.get(p["task"], 0) < show_failures:
            shown[p["task"]] = shown.get(p["task"], 0) + 1
            print(f"--- {p['question']!r}\nexpected {p['reasoning']!r} -> {p['answer']!r}\ngot      {o.outputs[0].text!r}")
        by_task.setdefault(p["task"], []).append(ok)
    for task, oks in sorted(by_task.items()):
        print(f"  {task}: {sum(oks)}/{len(oks)}")
    accuracy = correct / len(problems)
    print(f"held-out accuracy: {correct}/{len(problems)} = {accuracy:.1%}", flush=True)
    return accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "dsserve" / "assets" / "demo-r1"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=2600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--decay", type=float, default=0.35, help="share of the steps spent decaying the learning rate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (the reference run) or cuda (faster experiments)")
    ap.add_argument("--heldout", type=int, default=600)
    ap.add_argument("--eval", type=int, default=600, help="held-out problems to score at the end (0: skip)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--show-failures", type=int, default=0, help="print this many wrong answers per task")
    args = ap.parse_args()
    train(args)
    if args.eval:
        evaluate(Path(args.out), args.eval, args.show_failures)


if __name__ == "__main__":
    main()
