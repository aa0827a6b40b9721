"""Each check returns lines (ok, message); a failure says what to do."""

from __future__ import annotations

import importlib
import os
import platform
import socket
import sys
import tempfile
from typing import Any

from dsserve.config import log_dir
from dsserve.options import load_toml
from dsserve.doctor.access import check_access
from dsserve.doctor.files import Line
from dsserve.doctor.tls import check_tls
from dsserve.errors import DsserveError


def run_checks(model: str | None = None, config_file: str | None = None, port: int | None = None,
               rank_table: str | None = None, ssl_keyfile: str | None = None, ssl_certfile: str | None = None,
               ssl_ca_certs: str | None = None) -> list[Line]:
    """The checklist; the ssl_* arguments override the config's, as `dsserve serve`'s flags do."""
    options: dict[str, Any] = {}
    lines: list[Line] = []
    if config_file:
        try:
            options = load_toml(config_file)
            lines.append((True, f"config {config_file}: {len(options)} setting(s) read"))
        except DsserveError as e:
            lines.append((False, str(e)))
    flags = dict(ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile, ssl_ca_certs=ssl_ca_certs)
    options.update({k: v for k, v in flags.items() if v is not None})
    model = model or options.get("model")
    lines += _python_and_torch()
    lines += _devices()
    if model:
        lines += _model(model, options)
    else:
        lines.append((None, "no model given: pass --model PATH (or `model` in --config) to check the weights"))
    lines.append(_port(options.get("host", "127.0.0.1"), int(port or options.get("port", 8000))))
    lines += check_tls(options)
    lines += check_access(options)
    if rank_table:
        lines += _rank_table(rank_table)
    lines.append(_log_folder())
    return lines


def _python_and_torch() -> list[Line]:
    lines: list[Line] = []
    ok = sys.version_info >= (3, 10)
    lines.append((ok, f"Python {platform.python_version()}" + ("" if ok else ": dsserve needs 3.10 or newer")))
    try:
        import torch

        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
        ok = (major, minor) >= (2, 5)
        lines.append((ok, f"torch {torch.__version__}" + ("" if ok else ": dsserve needs torch 2.5 or newer")))
    except ImportError:
        lines.append((False, "torch is not installed: pip install torch==2.13.0"))
    return lines


def _devices() -> list[Line]:
    import torch

    lines: list[Line] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            lines.append((True, f"cuda:{i} {torch.cuda.get_device_name(i)}: {free / 2**30:.1f} of "
                                f"{total / 2**30:.1f} GiB free"))
    else:
        lines.append((None, "no CUDA device (driver or GPU absent): dsserve runs on the CPU"))
    try:
        torch_npu = importlib.import_module("torch_npu")  # noqa: F841 - registers torch.npu
        count = torch.npu.device_count()
        lines.append((True, f"{count} Ascend NPU(s) visible through torch_npu"))
    except ImportError:
        lines.append((None, "no torch_npu: Ascend NPUs are not visible to torch"))
    except Exception as e:  # a broken driver shows up here
        lines.append((False, f"torch_npu is installed but the NPUs cannot be queried ({e}); check the driver "
                             "(npu-smi info) and its version against torch_npu's"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines.append((True, f"CPU: {cores} core(s) available, {_mem_total_gib():.1f} GiB memory"))
    lines.append(_cpu_kernels())
    return lines


def _cpu_kernels() -> Line:
    """What the CPU path will use: the vector ISA torch picked, the packed-weight kernels available and the path
    attention, the linears and a decode step take (backends.cpu.kernels.status())."""
    import torch

    from dsserve.backends.cpu import kernels as cpu_kernels

    isa = torch.backends.cpu.get_cpu_capability()
    status = cpu_kernels.status()
    fp16 = "float16 (dsserve kernel)" if status.linear_f16 else "float16 (FBGEMM)"
    missing = {name: cpu_kernels.packed_weights_unavailable(dtype)
               for name, dtype in (("float32 (oneDNN)", torch.float32), (fp16, torch.float16))}
    have = [name for name, why in missing.items() if why is None]
    if cpu_kernels.packed_weights_unavailable(torch.bfloat16) is None:  # a CPU with AMX or AVX512-BF16: optional
        have.append("bfloat16 (dsserve AMX kernel)" if status.linear_bf16 else "bfloat16 (oneDNN)")
    built = ("decode attention, fp16 linear and small-op kernels built" if status.is_built
             else f"CPU kernels (decode attention, fp16 linear, small ops) unavailable ({status.why_not})")
    paths = "; ".join(f"{part}: {path}" for part, path in status.paths().items())
    if all(why is None for why in missing.values()) and status.is_built:
        return True, f"CPU kernels: {isa}; packed weights {', '.join(have)}; {built}; {paths}"
    reasons = "; ".join(f"{name}: {why}" for name, why in missing.items() if why is not None)
    fix = ("install a C compiler (apt install gcc) for dsserve's CPU kernels" if not status.is_built
           else "use the official torch CPU wheel (pip install torch==2.13.0)")
    return None, (f"CPU kernels: {isa}; packed weights {', '.join(have) or 'none'}{f' ({reasons})' if reasons else ''}; "
                  f"{built}; {paths}: CPU decode is slower than it could be; {fix}")


def _model(model: str, options: dict[str, Any]) -> list[Line]:
    from dsserve.plan.planner import plan
    from dsserve.weights.verify import verify

    lines: list[Line] = []
    report = verify(model)
    failures = report.failures
    lines.append((report.passed, f"model folder {model}: " + ("verified" if report.passed else
                  f"{len(failures)} problem(s): {failures[0]} (run `dsserve weights verify {model}` for all)")))
    if not report.passed:
        return lines
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = _closest_device(torch.cuda.get_device_properties(0).total_memory / 2**30)
    try:
        p = plan(model, device, devices_per_node=max(1, torch.cuda.device_count()) if device != "cpu" else 1,
                 dtype="bf16", max_model_len=int(options.get("max_model_len", 4096)))
        if p.fits:
            lines.append((True, f"the model fits: {p.devices} x {device}, up to {p.max_concurrent_sequences} sequences "
                                f"of {p.max_model_len} tokens"))
        else:
            lines.append((False, f"the model does not fit this machine ({device}): {p.reasons[-1] if p.reasons else ''}; "
                                 f"see `dsserve plan {model} --device ...` for what it needs"))
    except DsserveError as e:
        lines.append((False, f"planning failed: {e}"))
    return lines


def _port(host: str, port: int) -> Line:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True, f"port {host}:{port} is free"
        except OSError as e:
            return False, f"port {host}:{port} is taken ({e.strerror}); stop what uses it (ss -ltnp) or pass --port"


def _rank_table(path: str) -> list[Line]:
    from dsserve.mindie.ranktable import load, validate

    try:
        errors = validate(load(path))
    except DsserveError as e:
        return [(False, str(e))]
    if not errors:
        return [(True, f"rank table {path} is valid")]
    return [(False, f"rank table {path}: {e}") for e in errors]


def _log_folder() -> Line:
    folder = log_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
        return True, f"log folder {folder} is writable"
    except OSError as e:
        return False, f"log folder {folder} is not writable ({e.strerror}); set DSSERVE_LOG_DIR to a writable folder"


def _closest_device(total_gib: float) -> str:
    from dsserve.plan.presets import DEVICES

    return min(DEVICES, key=lambda name: abs(DEVICES[name] - total_gib))


def _mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


__all__ = ["run_checks"]
