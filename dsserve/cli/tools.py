"""Operator tools: plan, doctor, weights, ranktable, config (each reads files and configs, never runs the engine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dsserve.cli.flags import console
from dsserve.errors import DsserveError

weights_app = typer.Typer(no_args_is_help=True, help="Check and convert checkpoint folders.")
ranktable_app = typer.Typer(no_args_is_help=True, help="MindIE rank tables for multi-node deployments.")
config_app = typer.Typer(no_args_is_help=True, help="Configuration files.")


def plan(
    model: str = typer.Argument(..., help="checkpoint folder, config.json, or a preset: deepseek-r1, deepseek-v3, "
                                          "deepseek-v2, deepseek-v2-lite, r1-distill-{qwen-1.5b,qwen-7b,qwen-14b,"
                                          "qwen-32b,llama-8b,llama-70b}"),
    device: str = typer.Option("910b-64g", help="h100-80g|h800-80g|h200-141g|a100-40g|a100-80g|rtx4090-24g|910b-64g|cpu"),
    devices_per_node: int = typer.Option(8),
    dtype: str = typer.Option("bf16", help="weights: bf16|fp8|w8a8 as checkpoints hold them; int8|int4|int4-g64|"
                                           "int4-g128 (a -zp suffix: zero points) as dsserve's --quantization holds "
                                           "them on CPU"),
    max_model_len: int = typer.Option(4096, help="tokens per sequence (prompt + output)"),
    concurrency: int = typer.Option(1, help="sequences of max_model_len that must fit at once"),
    memory_fraction: float = typer.Option(0.9, help="share of each device's memory dsserve may use"),
    as_json: bool = typer.Option(False, "--json"),
):
    """How many devices and nodes a model needs, memory per device, and how many sequences fit."""
    from dsserve.plan.planner import is_dsserve_quantization, plan as make_plan

    p = make_plan(model, device, devices_per_node, dtype, max_model_len, concurrency, memory_fraction)
    if as_json:
        print(p.to_json())
        raise typer.Exit(0 if p.fits else 1)
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"[bold]{p.model}[/bold]: {p.params_total / 1e9:.2f}B parameters ({p.params_active / 1e9:.2f}B active per "
              f"token); {p.dtype} weights {p.weight_gib:.1f} GiB; KV cache {p.kv_bytes_per_token / 1024:.1f} KiB per token "
              f"(BF16, per device)")
    for reason in p.reasons:
        out.print(f"[dim]  not {reason}[/dim]")
    if p.fits:
        out.print(f"[green]fits[/green] on {p.devices} x {p.device} ({p.nodes} node(s) of {devices_per_node}): "
                  f"{p.weight_gib_per_device:.1f} GiB weights + {p.kv_gib_per_device:.1f} GiB KV per device of "
                  f"{p.device_memory_gib:.1f} GiB; up to {p.max_concurrent_sequences} concurrent sequences of "
                  f"{p.max_model_len} tokens")
        if p.load_peak_gib:
            out.print(f"loading peaks at about {p.load_peak_gib:.1f} GiB per rank (the weights, and the LM head "
                      "staged in bf16 until it is packed; on a CPU without native bf16 it is staged in float32: "
                      "twice that part)")
        out.print(f"launch: {p.launch}")
    if p.dtype != "bf16" and is_dsserve_quantization(p.dtype) and device != "cpu":
        out.print(f"[yellow]note[/yellow]: dsserve holds {p.dtype} weights (--quantization {p.dtype}) on a CPU only; "
                  "on this device plan with --dtype bf16.")
    elif p.dtype != "bf16" and not is_dsserve_quantization(p.dtype):
        out.print(f"[yellow]note[/yellow]: dsserve's engine dequantizes {p.dtype} weights to BF16 when it loads them; "
                  "these figures are for an engine that keeps them quantized. For a dsserve deployment, plan with "
                  "--dtype bf16.")
    if not p.fits:
        out.print(f"[bold red]does not fit[/bold red] on up to 64 nodes of {devices_per_node} x {p.device}, because "
                  + (p.reasons[-1] if p.reasons else "no device count is valid"))
    raise typer.Exit(0 if p.fits else 1)


def doctor(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="checkpoint folder to verify and size"),
    config: Optional[Path] = typer.Option(None, "--config", help="the TOML you give `dsserve serve --config`"),
    port: Optional[int] = typer.Option(None, help="port to check (default: the config's, else 8000)"),
    rank_table: Optional[Path] = typer.Option(None, help="rank table to validate"),
    ssl_keyfile: Optional[Path] = typer.Option(None, help="TLS private key to check (overrides the config's)"),
    ssl_certfile: Optional[Path] = typer.Option(None, help="TLS certificate (PEM) to check (overrides the config's)"),
    ssl_ca_certs: Optional[Path] = typer.Option(None, help="CA bundle for client certificates (overrides the config)"),
):
    """A pass/fail checklist: Python and torch, devices, the model folder, whether it fits, port, TLS files, API
    keys and network exposure, rank table, logs."""
    from rich.markup import escape

    from dsserve.doctor.checks import run_checks

    def text(path: Optional[Path]) -> Optional[str]:
        return str(path) if path else None

    lines = run_checks(model, text(config), port, text(rank_table), ssl_keyfile=text(ssl_keyfile),
                       ssl_certfile=text(ssl_certfile), ssl_ca_certs=text(ssl_ca_certs))
    out = Console(highlight=False, soft_wrap=True)
    for ok, message in lines:
        mark = {True: "[green]PASS[/green]", False: "[bold red]FAIL[/bold red]", None: "[dim]INFO[/dim]"}[ok]
        out.print(f"{mark} {escape(message)}")  # messages quote paths and `[[keys]]`, not markup
    failed = sum(ok is False for ok, _ in lines)
    out.print("[green]all checks passed[/green]" if not failed else f"[bold red]{failed} check(s) failed[/bold red]")
    raise typer.Exit(1 if failed else 0)


@ranktable_app.command("generate")
def ranktable_generate(
    nodes: str = typer.Option(..., help="node IPs, comma-separated, the master first"),
    devices_per_node: int = typer.Option(8),
    device_ips: Optional[Path] = typer.Option(None, help="lines `NODE_IP CARD0_IP CARD1_IP ...` (hccn_tool's card IPs)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write here instead of stdout"),
):
    """Write a rank table: device ids local per node, rank ids global and contiguous, the master first."""
    from dsserve.mindie.ranktable import generate, read_device_ips

    ips = read_device_ips(device_ips) if device_ips else None
    if ips is None:
        console.print("[yellow]no --device-ips: card IPs are set to the node IPs (enough for dsserve and torchrun; "
                      "MindIE needs the real card IPs)[/yellow]")
    text = json.dumps(generate([n.strip() for n in nodes.split(",") if n.strip()], devices_per_node, ips), indent=2)
    if output:
        output.write_text(text + "\n")
        console.print(f"wrote {output}")
    else:
        print(text)


@ranktable_app.command("validate")
def ranktable_validate(path: Path = typer.Argument(..., help="rank table JSON")):
    """Check a rank table; print every error with its location; exit 1 if any."""
    from dsserve.mindie.ranktable import load, validate

    errors = validate(load(path))
    out = Console(highlight=False, soft_wrap=True)
    for error in errors:
        out.print(f"[bold red]error[/bold red] {path}: {error}")
    if not errors:
        out.print(f"[green]valid[/green]: {path}")
    raise typer.Exit(1 if errors else 0)


@ranktable_app.command("env")
def ranktable_env(
    path: Path = typer.Argument(..., help="rank table JSON"),
    node: str = typer.Option(..., help="this node's IP (server_id or container_ip)"),
    master_port: int = typer.Option(29500),
):
    """The torch.distributed environment (MASTER_ADDR/PORT, WORLD_SIZE, RANK, LOCAL_RANK) of each process here."""
    from dsserve.mindie.ranktable import environment, load

    for variables in environment(load(path), node, master_port):
        print(" ".join(f"{k}={v}" for k, v in variables.items()))


@weights_app.command("verify")
def weights_verify(
    path: Path = typer.Argument(..., help="checkpoint folder"),
    manifest: Optional[Path] = typer.Option(None, help="check files against this sha256 manifest"),
    write_manifest: bool = typer.Option(False, help="write dsserve-manifest.json (sha256 of every file) into PATH"),
):
    """Check every shard, tensor, permission, symlink, the tokenizer and config.json; exit 1 on any failure."""
    from dsserve.weights.verify import verify

    report = verify(path, manifest, write_manifest)
    out = Console(highlight=False)
    for ok, message in report.lines:
        mark = {True: "[green]PASS[/green]", False: "[bold red]FAIL[/bold red]", None: "[dim]INFO[/dim]"}[ok]
        out.print(f"{mark} {message}")
    out.print("[green]verified[/green]" if report.passed else f"[bold red]{len(report.failures)} problem(s)[/bold red]")
    raise typer.Exit(0 if report.passed else 1)


@weights_app.command("convert")
def weights_convert(
    path: Path = typer.Argument(..., help="FP8 checkpoint folder (DeepSeek-V3/R1 as published)"),
    out: Path = typer.Argument(..., help="output folder (must not exist; OUT.partial holds work in progress)"),
    to: str = typer.Option("bf16", help="target dtype: bf16"),
):
    """FP8 block-wise -> BF16 on the CPU, shard by shard; resumable; the output appears only when complete."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from dsserve.weights.convert import convert_to_bf16

    if to not in ("bf16", "bfloat16"):
        raise typer.BadParameter("only --to bf16 is supported")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task("converting", total=None)

        def progress(shard: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=shard)

        result = convert_to_bf16(path, out, progress)
    console.print(f"wrote {result}")


@weights_app.command("quantize")
def weights_quantize(
    path: Path = typer.Argument(..., help="bf16 / fp16 / fp32 checkpoint folder (or DeepSeek's FP8: dequantized)"),
    out: Path = typer.Argument(..., help="output folder (must not exist; OUT.partial holds work in progress)"),
    to: str = typer.Option(..., help="int4 (W4A16) | int8 (W8A16, per row) | w8a8 (int8 weights and activations)"),
    group_size: int = typer.Option(32, help="int4: inputs per scale, 32 | 64 | 128"),
    zero_points: bool = typer.Option(False, help="int4: a zero point per group (asymmetric) instead of symmetric"),
):
    """Write a compressed-tensors checkpoint of dsserve's int4 / int8 / w8a8 weights (vLLM reads it too); shard by
    shard, resumable; the output appears only when complete."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from dsserve.formats.quantization import INT4_GROUP_SIZES, QuantScheme
    from dsserve.weights.quantize import quantize_checkpoint

    if to not in ("int4", "int8", "w8a8"):
        raise typer.BadParameter(f"--to {to!r}: the forms are int4, int8 and w8a8")
    if to == "int4" and group_size not in INT4_GROUP_SIZES:
        raise typer.BadParameter(f"--group-size {group_size}: int4 groups are 32, 64 or 128")
    if to != "int4" and (zero_points or group_size != 32):
        raise typer.BadParameter("--group-size and --zero-points apply to --to int4 only (int8 has one scale per row)")
    scheme = QuantScheme(4, group_size, zero_points) if to == "int4" else QuantScheme.parse(to)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task("quantizing", total=None)

        def progress(shard: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=shard)

        result = quantize_checkpoint(path, out, scheme, progress)
    console.print(f"wrote {result} ({scheme.name}, compressed-tensors)")


@config_app.command("import-mindie")
def config_import_mindie(path: Path = typer.Argument(..., help="MindIE's config.json")):
    """Print a `dsserve serve --config` TOML for a MindIE service config, with the fields that have no equivalent."""
    from dsserve.mindie.config_import import import_mindie, to_toml

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DsserveError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise DsserveError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    options, notes = import_mindie(data, path)  # the path: MindIE reads relative TLS paths from its install folder
    print(to_toml(options, notes), end="")
