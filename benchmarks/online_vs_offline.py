"""What the serving path costs: offline throughput (`LLM.generate`, as compare.py's dsserve leg) against
`dsserve serve` + `dsserve bench serve` on the same checkpoint and workload, alternated in rounds so that both
see the same period of a shared machine.

    python benchmarks/online_vs_offline.py --models qwen2 deepseek --weight-dtype bfloat16 --kv-cache-dtype float16 \
        --stream-intervals 1 2 4 8 --rounds 2

Each round measures offline before and after its online runs and divides by the mean of the two. Each online run
starts a server (127.0.0.1, --max-model-len 512), warms it with 4 short requests, then runs
--num-prompts streams of --input-len random token ids and exactly --output-len new tokens, --max-concurrency
--num-prompts, and stops the server. Reported per run: output tokens/s, online / offline of the same round, TTFT,
TPOT and ITL medians, and the CPU seconds the timed run cost the server's busy threads (the engine's OpenMP
threads, then the HTTP thread) and the client process (which shares the machine: on a small CPU its time is
taken from the engine too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import compare  # noqa: E402  (the checkpoints, the prompts and the offline leg)


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of a process, keyed by name:tid."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[f"{name}:{tid}"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def online(path: Path, port: int, args, stream_interval: int) -> dict:
    serve = [sys.executable, "-m", "dsserve.cli", "serve", str(path), "--host", "127.0.0.1", "--port", str(port),
             "--max-model-len", "512", "--weight-dtype", args.weight_dtype, "--kv-cache-dtype", args.kv_cache_dtype,
             "--stream-interval", str(stream_interval)]
    log = tempfile.NamedTemporaryFile("w", prefix="dsserve-serve-", suffix=".log", delete=False)
    server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if server.poll() is not None:
                raise RuntimeError(f"dsserve serve exited with {server.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        bench = [sys.executable, "-m", "dsserve.cli", "bench", "serve", "--base-url", url, "--vocab-size", "32000"]
        subprocess.run(bench + ["--num-prompts", "4", "--input-len", "16", "--output-len", "8"], check=True,
                       capture_output=True)
        result_file = Path(tempfile.mkdtemp()) / "online.json"
        before, children = thread_cpu_s(server.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(bench + ["--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
                                "--output-len", str(args.output_len), "--max-concurrency", str(args.num_prompts),
                                "--save-result", str(result_file)], check=True, capture_output=True)
        after, children_after = thread_cpu_s(server.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        server.terminate()
        server.wait(30)
    result = json.loads(result_file.read_text())
    busy = sorted((after[k] - before.get(k, 0.0) for k in after), reverse=True)
    result["cpu_s"] = {  # the engine's OpenMP threads first, then the HTTP thread
        "server threads": [round(s, 2) for s in busy if s >= 0.05],
        "client (with its start-up)": round(children_after.ru_utime + children_after.ru_stime
                                            - children.ru_utime - children.ru_stime, 2),
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2"], choices=list(compare.SHAPES))
    ap.add_argument("--weight-dtype", default="bfloat16")
    ap.add_argument("--kv-cache-dtype", default="float16")
    ap.add_argument("--stream-intervals", nargs="+", type=int, default=[1])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=8731)
    args = ap.parse_args()
    port = args.port
    tokens = args.num_prompts * args.output_len
    ratios: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: compare.build(name, Path(tmp) / name) for name in args.models}

        def offline_rate(path: Path) -> float:
            batch = compare.prompts(args.num_prompts, args.input_len, 32000)
            return tokens / compare.run_dsserve(path, batch, args.output_len, weight_dtype=args.weight_dtype,
                                                kv_cache_dtype=args.kv_cache_dtype)

        for round_ in range(1, args.rounds + 1):
            for name, path in paths.items():
                # Offline before and after the round's online runs: the machine's speed drifts, and the mean of the
                # two is a steadier denominator than either alone.
                before = offline_rate(path)
                print(f"round {round_} {name}: offline {before:.1f} tok/s", flush=True)
                rows = []
                for interval in args.stream_intervals:
                    rows.append((interval, online(path, port, args, interval)))
                    port += 1
                after = offline_rate(path)
                offline = (before + after) / 2
                print(f"round {round_} {name}: offline again {after:.1f} tok/s; mean {offline:.1f}", flush=True)
                for interval, r in rows:
                    rate = r["output_token_throughput"]
                    ratios.setdefault((name, interval), []).append(rate / offline)
                    medians = ", ".join(f"{k[:-3].upper()} {r[k]['median']:.1f} ms"
                                        for k in ("ttft_ms", "tpot_ms", "itl_ms"))
                    print(f"round {round_} {name}: --stream-interval {interval}: online {rate:.1f} tok/s "
                          f"({rate / offline:.2f} of offline); {medians}; CPU s {r['cpu_s']}", flush=True)
    print("online / offline over the rounds (min / median / max):")
    for (name, interval), values in ratios.items():
        print(f"  {name} --stream-interval {interval}: {min(values):.2f} / {statistics.median(values):.2f} / "
              f"{max(values):.2f}")


if __name__ == "__main__":
    main()
