"""The CPU kernels: decode attention over the paged cache (paged_attention.c), the float16-weight linear
(linear_f16.c), the int8 / int4 weight-only linears (linear_quant.c) and a decoder layer's small ops (elementwise.c:
RMSNorm, rotary, silu * up), built once per machine with the system C compiler into one library, loaded with ctypes
and called on float32 CPU tensors; and which packed-weight GEMMs (oneDNN, FBGEMM) this torch build has. A leaf
module (torch and the standard library only): the doctor asks it too.

Why C: plain torch has no attention that reads a paged cache in place, and at decode sizes its SDPA over a
gathered copy is bound by per-call overhead (docs/benchmarks.md). The kernel reads every key and value once,
through the block table, with an online softmax, on torch's own OpenMP threads. The float16 linear streams
panel-packed half-precision weights through an AVX2 micro-kernel: 1.3-2x FBGEMM's fp16 GEMV at batch 1 and
1.1-1.4x its GEMM at batch 64 on the same weights (benchmarks/cpu_linears.py).

The library is compiled on first use into $DSSERVE_CACHE_DIR (default $XDG_CACHE_HOME/dsserve, else
~/.cache/dsserve)/kernels, named by a hash of the source, the flags and the compiler, written to a temporary
file and renamed (ranks starting together do not collide), with its sha256 recorded beside it (`<name>.sha256`,
also written atomically). The folder is created private (0700); one another user owns or can write to is not
trusted (a library there would run as this process): the build goes to a fresh private temporary folder
instead, with a warning. A cached library is loaded only when its sha256 matches the record; a changed or
unrecorded one, or one that fails to load, is rebuilt once. No compiler, a failed build, a library that disagrees
with csrc/dsserve_kernels.h or DSSERVE_CPU_KERNELS=0: `library()` is None and attention takes the torch path
(logged once); `status()` says which path each part takes.

The C interface is written once, in csrc/dsserve_kernels.h: every .c includes it, and the ctypes bindings and
structs are built from it at the first load (the last section of this file).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import math
import mmap
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from dsserve.errors import ConfigError

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name
           for name in ("paged_attention.c", "linear_f16.c", "linear_bf16.c", "elementwise.c", "moe.c",
                        "decode_layers.c", "linear_quant.c", "linear_fp8.c", "linear_w8a8.c")]
HEADER = CSRC / "dsserve_kernels.h"  # the C interface: kernels.py binds it (pycparser), every .c includes it
HEADERS = [HEADER, CSRC / "vec_math.h", CSRC / "amx.h"]
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": ctypes.CDLL | None once tried, "why": the reason when None


def cache_dir() -> Path:
    """Where the built library is kept (the build creates it 0700 and checks it is private before use)."""
    if os.environ.get("DSSERVE_CACHE_DIR"):
        return Path(os.environ["DSSERVE_CACHE_DIR"]) / "kernels"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dsserve" / "kernels"


def _isa_flags() -> list[str]:
    """The vector ISA torch itself dispatches to on this CPU (so the build never uses an instruction it lacks)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-mavx512f", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"]
    if capability == "AVX2":
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def _amx_flags() -> list[str]:
    """linear_bf16.c's extra flags where this CPU has AMX tiles and AVX512-BF16 (elsewhere it builds as a stub and
    bf16 weights go to oneDNN)."""
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    if platform.machine().lower() not in ("x86_64", "amd64") or not all(f is not None and f() for f in probes):
        return []
    return ["-mamx-tile", "-mamx-bf16", "-mavx512bf16", "-mavx512f", "-mavx512bw", "-mavx512vl"]


def _w8a8_flags() -> list[str]:
    """linear_w8a8.c's extra flags where this CPU has AVX512-VNNI, with AMX int8 tiles where it has those too
    (elsewhere it builds as a stub and w8a8 is refused). No contraction: the final scaling and the bias add round
    apart, as in the twin, and the same on the tile and the VNNI path (gcc fuses them in one and not the other)."""
    vnni, amx = getattr(torch.cpu, "_is_vnni_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None)
    if platform.machine().lower() not in ("x86_64", "amd64") or vnni is None or not vnni():
        return []
    return ["-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
            *(["-mamx-tile", "-mamx-int8"] if amx is not None and amx() else [])]


# moe.c scales each expert row and adds it in one loop, where an FMA would round once instead of the module path's
# twice (`*=`, then index_add_): no contraction there, so both paths give the same bits.
_FILE_FLAGS = {"linear_bf16.c": _amx_flags, "linear_fp8.c": _amx_flags, "linear_w8a8.c": _w8a8_flags,
               "moe.c": lambda: ["-ffp-contract=off"]}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang; or set CC)")
    # -fno-trapping-math: nothing reads FP exception flags, and without it gcc will not vectorize a loop with a
    # select (silu, the softmax exp's clamp): those ran scalar, 4-8x slower. -Werror=missing-prototypes: an
    # exported function missing from dsserve_kernels.h (so from the ctypes bindings) does not build.
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
             "-Werror=missing-prototypes", *_isa_flags()]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    file_flags = {name: probe() for name, probe in _FILE_FLAGS.items()}
    digest = hashlib.sha256("\0".join([*(src.read_text() for src in SOURCES + HEADERS), _layout_source(), *flags,
                                       *version, repr(sorted(file_flags.items()))]).encode()).hexdigest()[:16]
    target = _private_cache_dir() / f"dsserve_cpu-{digest}.so"
    lib = _load_verified(target, lambda output: _compile_and_link(compiler, flags, output, file_flags))
    _bind(lib)
    return lib


def _compile_and_link(compiler: str, flags: list[str], output: str, file_flags: dict[str, list[str]]) -> None:
    """Each source to an object at once (one compiler process per file: the build takes the slowest file's
    time, ~2 s with gcc -O3, not the sum), then one shared library. A file with extra flags (linear_bf16.c's AMX
    flags) that fails with them is compiled again without them, as the stub it then is: an older compiler
    without -mamx-tile costs the bf16 kernel, not the library."""
    compile_flags = [f for f in flags if f != "-shared"]

    def start(src: Path, obj: Path, extra: list[str]) -> subprocess.Popen:
        return subprocess.Popen([compiler, *compile_flags, *extra, "-c", str(src), "-o", str(obj)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    with tempfile.TemporaryDirectory() as work:
        layout = Path(work) / "struct_layout.c"  # generated from the header: dsserve_struct_layout's table
        layout.write_text(_layout_source())
        jobs = [(src, Path(work) / f"{src.stem}.o") for src in [*SOURCES, layout]]
        extra = {**file_flags, layout.name: ["-I", str(CSRC)]}
        running = [(src, obj, start(src, obj, extra.get(src.name, []))) for src, obj in jobs]
        for src, obj, proc in running:
            _, err = proc.communicate()
            if proc.returncode != 0 and file_flags.get(src.name):
                logger.warning("%s did not build with %s (%s): built without them", src.name,
                               " ".join(file_flags[src.name]), err.strip()[-300:])
                proc = start(src, obj, [])
                _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"{Path(compiler).name} failed on {src.name}: {err.strip()[-800:]}")
        out = subprocess.run([compiler, *flags, *(str(obj) for _, obj in jobs), "-o", output],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed linking: {out.stderr.strip()[-800:]}")


def _private_cache_dir() -> Path:
    """cache_dir(), created 0700; a fresh private temporary folder when it exists but is not private."""
    folder = cache_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
        os.chmod(folder, 0o700)  # exactly 0700, whatever the umask
    except FileExistsError:
        pass
    info = folder.stat()
    problems = []
    if info.st_uid != os.getuid():
        problems.append(f"owned by uid {info.st_uid}, not this user ({os.getuid()})")
    if info.st_mode & 0o022:
        problems.append(f"mode {oct(info.st_mode & 0o777)} lets group or others write there")
    if not problems:
        return folder
    fresh = Path(tempfile.mkdtemp(prefix="dsserve-kernels-"))  # 0700
    atexit.register(shutil.rmtree, fresh, ignore_errors=True)
    logger.warning("kernel cache %s is not private (%s): no library is loaded from it; building in %s for this "
                   "process instead. Fix: chmod 700 %s if it is yours, or set DSSERVE_CACHE_DIR to a folder only "
                   "you can write", folder, "; ".join(problems), fresh, folder)
    return fresh


def _load_verified(target: Path, build) -> ctypes.CDLL:
    """The library at `target` when its sha256 matches the record beside it; otherwise (changed, unrecorded,
    missing, or failing to load) built again with `build(output_path)` and loaded (an OSError then propagates)."""
    record = target.with_name(target.name + ".sha256")
    if target.exists():
        recorded = record.read_text().strip() if record.exists() else None
        if recorded == _sha256(target):
            try:
                return ctypes.CDLL(str(target))
            except OSError as e:
                logger.warning("cached kernel library %s does not load (%s): rebuilding it", target, e)
        elif recorded is None:  # built before records were kept, or the record was lost
            logger.info("cached kernel library %s has no sha256 record: rebuilding it", target)
        else:
            logger.warning("cached kernel library %s does not match its recorded sha256 (changed since it was "
                           "built): rebuilding it", target)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        build(tmp)
        _write_atomic(record, _sha256(Path(tmp)) + "\n")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ctypes.CDLL(str(target))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first call; None (and the reason logged once) where it cannot be."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            lib, why = None, None
            if os.environ.get("DSSERVE_CPU_KERNELS", "1") == "0":
                why = "DSSERVE_CPU_KERNELS=0"
            else:
                try:
                    lib = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    why = str(e)
            if lib is None:
                logger.warning("CPU kernels unavailable (%s): decode attention takes the torch path and float16 "
                               "weights FBGEMM's GEMM (slower; same results)", why)
            _state.update(lib=lib, why=why, width=lib.dsserve_vector_width() if lib is not None else 0,
                          half=bool(lib.dsserve_half_supported()) if lib is not None else False,
                          linear_f16=bool(lib.dsserve_linear_f16_supported()) if lib is not None else False,
                          linear_bf16=bool(lib.dsserve_linear_bf16_supported()) if lib is not None else False,
                          linear_quant=bool(lib.dsserve_linear_quant_supported()) if lib is not None else False,
                          linear_fp8=bool(lib.dsserve_linear_fp8_supported()) if lib is not None else False,
                          w8a8=lib.dsserve_linear_w8a8_supported() if lib is not None else 0)
    return _state["lib"]  # type: ignore[return-value]


def why_unavailable() -> str | None:
    """Why `library()` is None (after it was called), for the doctor and the logs."""
    return _state.get("why")  # type: ignore[return-value]


@dataclass(frozen=True)
class KernelStatus:
    """Which CPU path runs: the library's state and the kernels it has (each False where it is not built)."""

    is_built: bool            # the library compiled, loaded and matched dsserve_kernels.h
    why_not: str | None       # why it is not (no compiler, a failed build, DSSERVE_CPU_KERNELS=0, ...)
    vector_width: int         # floats per vector: attention head sizes must be multiples of it (0: none)
    paged_attention: bool     # decode attention reads the paged cache in C (a float32 cache)
    half_cache: bool          # ... a float16 cache too (AVX2 + F16C)
    linear_f16: bool          # float16 weights run linear_f16.c (else FBGEMM's fp16 GEMM)
    linear_bf16: bool         # bfloat16 weights run linear_bf16.c's AMX kernel (else oneDNN)
    linear_quant: bool = False  # int8 / int4 weights (--quantization) run linear_quant.c (AVX-512; else refused)
    linear_fp8: bool = False    # fp8 weights (FP8 checkpoints kept, --quantization fp8) run linear_fp8.c (AMX)
    linear_w8a8: bool = False   # w8a8 runs linear_w8a8.c (AVX512-VNNI; else refused) ...
    w8a8_amx: bool = False      # ... with AMX int8 tiles for many rows

    @property
    def fused_decode(self) -> bool:
        """A decode step may run every layer in one C call (decode_layers.c): it needs attention and a packed
        linear (the model checks the rest: one device, its weights in dsserve's packing)."""
        return self.paged_attention and (self.linear_f16 or self.linear_bf16)

    def paths(self) -> dict[str, str]:
        """The path each part of a CPU decode takes, in words (the doctor prints these)."""
        if not self.is_built:
            return {"attention": "torch (gathered copy of the cache)",
                    "linears": "float16 FBGEMM, bfloat16 and float32 oneDNN",
                    "decode": "per-layer torch modules"}
        caches = "float32 and float16 caches" if self.half_cache else "float32 cache; float16 one: torch"
        return {"attention": f"C kernel paged_attention.c ({caches})",
                "linears": ", ".join(["float16 " + ("C kernel linear_f16.c" if self.linear_f16 else "FBGEMM"),
                                      "bfloat16 " + ("C AMX kernel linear_bf16.c" if self.linear_bf16 else "oneDNN"),
                                      "float32 oneDNN",
                                      "int8/int4 " + ("C kernel linear_quant.c" if self.linear_quant
                                                      else "unavailable (needs AVX-512)"),
                                      "fp8 " + ("C AMX kernel linear_fp8.c" if self.linear_fp8
                                                else "unavailable (needs AMX + AVX512-BF16): FP8 checkpoints load "
                                                     "dequantized"),
                                      "w8a8 " + ("C kernel linear_w8a8.c (" + ("AMX int8 tiles + " if self.w8a8_amx
                                                                               else "") + "AVX512-VNNI)"
                                                 if self.linear_w8a8 else "unavailable (needs AVX512-VNNI)")]),
                "decode": ("every layer in one C call (decode_layers.c) where the model's weights are packed for it"
                           if self.fused_decode else "per-layer modules")}


def status() -> KernelStatus:
    """Which CPU kernels this process runs (building the library first if it has not been tried)."""
    built = library() is not None
    return KernelStatus(is_built=built, why_not=why_unavailable(), vector_width=int(_state["width"]),
                        paged_attention=built, half_cache=bool(_state["half"]), linear_f16=bool(_state["linear_f16"]),
                        linear_bf16=bool(_state["linear_bf16"]), linear_quant=bool(_state["linear_quant"]),
                        linear_fp8=bool(_state["linear_fp8"]),
                        linear_w8a8=_state["w8a8"] >= 1, w8a8_amx=_state["w8a8"] == 2)


def usable(k_dim: int, v_dim: int, cache_dtype: torch.dtype = torch.float32) -> bool:
    """The kernel is built and handles these head sizes (multiples of its vector width: 8 floats with AVX2) and
    this cache dtype (float32; float16 with the AVX2 + F16C build)."""
    if library() is None or k_dim % _state["width"] or v_dim % _state["width"]:
        return False
    return cache_dtype == torch.float32 or (cache_dtype == torch.float16 and bool(_state["half"]))


def paged_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float, *, num_kv_heads: int, v_dim: int, token_stride: int, head_stride: int, v_offset: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query per sequence over its first context_lens[b] cached tokens.

    q (B, H, Dk) float32; cache float32 or float16 (read as float32), contiguous, in the layout paged_attention.c
    describes; block_tables
    (B, >= ceil(len / block_size)) and context_lens (B,) int64. Returns (B, H, v_dim)."""
    lib = library()
    assert lib is not None, "paged_decode needs the kernel library (check backends.cpu.kernels.library() first)"
    batch, num_heads, k_dim = q.shape
    q = q.contiguous()
    tables = block_tables if block_tables.dtype == torch.int64 else block_tables.long()
    if tables.stride(1) != 1:  # rows may be strided (a slice of the step's table), entries not
        tables = tables.contiguous()
    lens = context_lens.contiguous()
    if out is None:
        out = torch.empty(batch, num_heads, v_dim, dtype=torch.float32)
    # One task per sequence (its blocks read once, in order), or with fewer sequences than threads its heads split
    # so that every thread has one (batch 1, 8/2 heads: 0.035-0.045 ms vs 0.047-0.063 with two tasks per thread).
    threads = torch.get_num_threads()
    chunks = min(num_heads, max(1, -(-threads // batch)))
    heads_per_task = -(-num_heads // chunks)
    status = lib.dsserve_paged_decode(
        q.data_ptr(), cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
        batch, num_heads, num_kv_heads, k_dim, v_dim, cache.shape[1], tables.stride(0), token_stride, head_stride,
        0, v_offset, heads_per_task, scale, int(cache.dtype == torch.float16),
    )
    if status == -3:
        raise ValueError("this build of the kernel reads no float16 cache (check usable() first)")
    if status == -2:
        raise ValueError(f"head sizes {k_dim}/{v_dim} are not multiples of the kernel's vector width (check usable())")
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its scratch buffers")
    return out


def linear_f16_usable() -> bool:
    """The library is built with the float16-weight linear (x86 with AVX2, FMA and F16C)."""
    return library() is not None and bool(_state["linear_f16"])


PANEL = 16  # output rows per panel of the packed float16 layout (linear_f16.c)


def linear_bf16_usable() -> bool:
    """The library is built with the bfloat16-weight linear (AMX tiles + AVX512-BF16) and Linux lets this process
    use the tile unit."""
    return library() is not None and bool(_state["linear_bf16"])


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """A float32 or bfloat16 (N, K) weight in linear_bf16.c's layout: an even number of 16-row panels, K (padded to
    32) in pairs, packed[p, k // 2, n, k % 2] = W[16 p + n, k] in bfloat16 (rounded to nearest even); zero padding.
    Filled 256 panels at a time: beside the weight, it needs the packed bytes and one chunk's staging."""
    rows, cols = weight.shape
    panels = -(-rows // PANEL)
    panels += panels % 2
    depth = -(-cols // 32) * 32
    packed = torch.empty(panels, depth // 2, PANEL, 2, dtype=torch.bfloat16)
    chunk = 256
    for first in range(0, panels, chunk):
        count = min(chunk, panels - first)
        staging = torch.zeros(count * PANEL, depth, dtype=torch.bfloat16)
        part = weight[first * PANEL : min(rows, (first + count) * PANEL)]
        staging[: part.shape[0], :cols] = part.detach()
        packed[first : first + count] = staging.view(count, PANEL, depth // 2, 2).permute(0, 2, 1, 3)
    return packed


def linear_bf16(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) float32 @ W^T (+ bias) for a weight packed by `pack_bf16`: (..., out_features) float32."""
    return _linear("dsserve_linear_bf16", "bfloat16", x, packed, out_features, bias)


def linear_bf16_swiglu(x: torch.Tensor, packed: torch.Tensor, intermediate: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x Wg^T) * (x Wu^T) for a (2 I, K) gate_up weight (gate rows first) packed by `pack_bf16`, I a multiple
    of 16: x (T, K) float32 -> (T, I) float32, without the (T, 2 I) product in memory; into `out` (T, I) float32
    contiguous where given."""
    if intermediate % PANEL:
        raise ValueError(f"the fused SwiGLU needs an intermediate size that is a multiple of {PANEL}, got {intermediate}")
    if x.dtype != torch.float32:
        raise TypeError(f"the bfloat16 linear takes float32 activations, got {x.dtype}")
    x = x if x.is_contiguous() else x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], intermediate, dtype=torch.float32)
    elif out.shape != (x.shape[0], intermediate) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 ({x.shape[0]}, {intermediate}) tensor")
    if x.shape[0]:
        _check_linear(_state["lib"].dsserve_linear_bf16_swiglu(x.data_ptr(), packed.data_ptr(), out.data_ptr(),
                                                               x.shape[0], intermediate, x.shape[1]),
                      "bfloat16", x.shape)
    return out


def pack_f16(weight: torch.Tensor) -> torch.Tensor:
    """A float32 (N, K) weight in linear_f16.c's packed float16 layout: (ceil(N / 16), K, 16) halves, rows past N
    zero. Rounds to nearest even (the same values as weight.half())."""
    lib = library()
    assert lib is not None and _state["linear_f16"], "pack_f16 needs linear_f16_usable()"
    weight = weight.detach().float().contiguous()
    rows, cols = weight.shape
    packed = torch.empty(-(-rows // PANEL), cols, PANEL, dtype=torch.float16)
    lib.dsserve_pack_f16(weight.data_ptr(), rows, cols, packed.data_ptr())
    return packed


def linear_f16(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) float32 @ W^T (+ bias) for a weight packed by `pack_f16`: (..., out_features) float32."""
    return _linear("dsserve_linear_f16", "float16", x, packed, out_features, bias)


def _linear(kernel: str, weights: str, x: torch.Tensor, packed: torch.Tensor, out_features: int,
            bias: torch.Tensor | None, scales: torch.Tensor | None = None) -> torch.Tensor:
    """`kernel`(x, packed[, scales], bias, y, M, N, K): the 16-bit linears, and fp8's with its scales."""
    if x.dim() != 2:
        return _linear(kernel, weights, x.reshape(-1, x.shape[-1]), packed, out_features, bias, scales).view(
            *x.shape[:-1], out_features)
    if x.dtype != torch.float32:
        raise TypeError(f"the {weights} linear takes float32 activations, got {x.dtype}")
    if not x.is_contiguous():
        x = x.contiguous()
    rows = x.shape[0]
    out = torch.empty(rows, out_features, dtype=torch.float32)
    if rows:
        weights_args = (packed.data_ptr(),) if scales is None else (packed.data_ptr(), scales.data_ptr())
        _check_linear(getattr(_state["lib"], kernel)(x.data_ptr(), *weights_args,
                                                     0 if bias is None else bias.data_ptr(), out.data_ptr(), rows,
                                                     out_features, x.shape[1]),
                      weights, x.shape)
    return out


def _check_linear(status: int, weights: str, shape: torch.Size) -> None:
    if status == -3:
        raise MemoryError(f"the {weights} linear could not allocate its scratch buffer ({shape[0]} x {shape[1]})")
    if status == -4:
        raise RuntimeError("Linux refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM); "
                           "run with --weight-dtype float16")
    if status != 0:
        raise RuntimeError(f"the {weights} linear kernel is not in this build (status {status}); "
                           "run with --weight-dtype float16 or float32")


def linear_quant_usable() -> bool:
    """The library is built with the int8 / int4 weight-only linears (x86 with AVX-512)."""
    return library() is not None and bool(_state["linear_quant"])


@dataclass(frozen=True)
class QuantPanels:
    """A quantized (N, K) weight in linear_quant.c's layout: panels of 16 output rows, an even number of them."""

    bits: int                   # 8 or 4
    packed: torch.Tensor        # int8 (panels, K, 16); int4: uint8 (panels, groups * group / 2, 16), two inputs a byte
    scales: torch.Tensor        # int8: float32 (panels * 16,); int4: float16 (panels, groups, 16)
    zeros: torch.Tensor | None  # int4 with zero points: uint8 (panels, groups, 16)
    group_size: int             # int4's inputs per scale; 0 for int8
    in_features: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (self.zeros.nbytes if self.zeros is not None else 0)

    @functools.cached_property
    def struct(self) -> ctypes.Structure:
        """This weight as the C structs take it (dsserve_quant_weight: the fused decoders, moe_grouped); it points
        into these tensors, which live as long as this object."""
        return _struct("dsserve_quant_weight")(
            packed=self.packed.data_ptr(), scales=self.scales.data_ptr(),
            zeros=self.zeros.data_ptr() if self.zeros is not None else None, group=self.group_size, bits=self.bits)

def pack_quantized(weight) -> QuantPanels | Fp8Panels | W8A8Panels:
    """A `formats.quantization.QuantizedWeight` in its kernel's layout: linear_quant.c's for int8 / int4 (that file
    draws it), linear_fp8.c's for fp8 (`pack_fp8`), linear_w8a8.c's for w8a8 (`pack_w8a8`)."""
    if weight.scheme.float8:
        return pack_fp8(weight)
    if weight.scheme.activations:
        return pack_w8a8(weight)
    q, rows = weight.q, weight.q.shape[0]
    panels = -(-rows // PANEL)
    panels += panels % 2
    padded_rows = panels * PANEL

    def panel_major(t: torch.Tensor) -> torch.Tensor:  # (rows, C) -> (panels, C, 16), rows past N zero
        out = torch.zeros(padded_rows, t.shape[1], dtype=t.dtype)
        out[:rows] = t
        return on_huge_pages(out.view(panels, PANEL, t.shape[1]).transpose(1, 2))

    if weight.scheme.bits == 8:
        scales = torch.zeros(padded_rows, dtype=torch.float32)
        scales[:rows] = weight.scales
        return QuantPanels(8, panel_major(q), scales, None, 0, weight.in_features)
    pairs = q[:, 0::2] | (q[:, 1::2] << 4)  # (rows, padded K / 2): input 2 i in the low nibble, 2 i + 1 in the high
    zeros = panel_major(weight.zeros) if weight.zeros is not None else None
    return QuantPanels(4, panel_major(pairs), panel_major(weight.scales), zeros, weight.scheme.group_size,
                       weight.in_features)


_HUGE_PAGE = 2 << 20


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """t's values, contiguous; from 4 MiB up in a fresh private anonymous mapping advised MADV_HUGEPAGE and aligned
    to 2 MiB, so that Linux backs it with 2 MiB pages where it can (transparent huge pages are often enabled for
    advised mappings only, as on the 2-core Xeon). A batch-1 GEMV streams its weights from memory once per step; on
    4 KiB pages every page crossing of each stream is a TLB miss and a restart of the hardware prefetcher (weights in
    memory, one thread: int8 12-15 -> 15-16 GB/s, bf16 15 -> 17). Smaller tensors keep torch's allocation (the
    alignment slack would be a large share of them). The mapping lives as long as the tensor or a view of it."""
    if t.nbytes < 2 * _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t.contiguous()
    mapping = mmap.mmap(-1, t.nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: each 2 MiB is faulted in as one page
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping
    start = -raw.data_ptr() % _HUGE_PAGE
    out = raw[start:start + t.nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def linear_quant(x: torch.Tensor, panels: QuantPanels, out_features: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) float32 @ W^T (+ bias) for a weight `pack_quantized` laid out: (..., out_features) float32."""
    if x.dim() != 2:
        return linear_quant(x.reshape(-1, x.shape[-1]), panels, out_features, bias).view(*x.shape[:-1], out_features)
    if x.dtype != torch.float32:
        raise TypeError(f"the int{panels.bits} linear takes float32 activations, got {x.dtype}")
    if x.shape[1] != panels.in_features:
        raise ValueError(f"the int{panels.bits} linear has {panels.in_features} inputs, x has {x.shape[1]}")
    x = x if x.is_contiguous() else x.contiguous()
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    if not x.shape[0]:
        return out
    lib, b = _state["lib"], 0 if bias is None else bias.data_ptr()
    if panels.bits == 8:
        status = lib.dsserve_linear_int8(x.data_ptr(), panels.packed.data_ptr(), panels.scales.data_ptr(), b,
                                         out.data_ptr(), x.shape[0], out_features, x.shape[1])
    else:
        status = lib.dsserve_linear_int4(x.data_ptr(), panels.packed.data_ptr(), panels.scales.data_ptr(),
                                         0 if panels.zeros is None else panels.zeros.data_ptr(), b, out.data_ptr(),
                                         x.shape[0], out_features, x.shape[1], panels.group_size)
    if status == -2:
        raise ValueError(f"the int4 linear takes an even group size of at most 256, got {panels.group_size}")
    _check_linear(status, f"int{panels.bits}", x.shape)
    return out


def linear_fp8_usable() -> bool:
    """The library is built with the fp8-weight linear (AMX tiles + AVX512-BF16) and may use the tile unit."""
    return library() is not None and bool(_state["linear_fp8"])


FP8_BLOCK = 128  # inputs per scale in linear_fp8.c's layout


@dataclass(frozen=True)
class Fp8Panels:
    """An fp8 (N, K) weight in linear_fp8.c's layout: an even number of 16-row panels, K padded to whole blocks of
    128 inputs."""

    packed: torch.Tensor  # uint8 (panels, Kp / 2, 16, 2): the e4m3 bytes, input pairs side by side
    scales: torch.Tensor  # float32 (panels, Kp / 128, 16): one per output row per 128 inputs, zero past N
    in_features: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes


def pack_fp8(weight) -> Fp8Panels:
    """An fp8 `QuantizedWeight` (any of its scale shapes: blocks of 128 x 128, per row) in linear_fp8.c's layout:
    packed[p, k // 2, n, k % 2] = q[16 p + n, k] as bytes, and each row's scale per 128 inputs. Filled 256 panels
    at a time: beside the weight it needs the packed bytes and one chunk's staging."""
    q, scales = weight.q, weight.row_scales()  # (N, K) e4m3, (N, ceil(K / 128)) float32
    rows, cols = q.shape
    panels = -(-rows // PANEL)
    panels += panels % 2
    blocks = -(-cols // FP8_BLOCK)
    depth = blocks * FP8_BLOCK
    packed = torch.empty(panels, depth // 2, PANEL, 2, dtype=torch.uint8)
    chunk = 256
    for first in range(0, panels, chunk):
        count = min(chunk, panels - first)
        staging = torch.zeros(count * PANEL, depth, dtype=torch.uint8)
        part = q[first * PANEL : min(rows, (first + count) * PANEL)]
        staging[: part.shape[0], :cols] = part.view(torch.uint8)
        packed[first : first + count] = staging.view(count, PANEL, depth // 2, 2).permute(0, 2, 1, 3)
    padded = torch.zeros(panels * PANEL, blocks, dtype=torch.float32)
    padded[:rows] = scales
    return Fp8Panels(packed, padded.view(panels, PANEL, blocks).transpose(1, 2).contiguous(), cols)


def linear_fp8(x: torch.Tensor, panels: Fp8Panels, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) float32 @ W^T (+ bias) for a weight `pack_fp8` laid out: (..., out_features) float32. One row keeps
    x in fp32; several round it to bf16 (formats/quantization.py `reference_linear` is the twin of both)."""
    if x.shape[-1] != panels.in_features:
        raise ValueError(f"the fp8 linear has {panels.in_features} inputs, x has {x.shape[-1]}")
    return _linear("dsserve_linear_fp8", "fp8", x, panels.packed, out_features, bias, panels.scales)


def linear_w8a8_usable() -> bool:
    """The library is built with the w8a8 linear (AVX512-VNNI; AMX int8 tiles for many rows where there are)."""
    return library() is not None and _state["w8a8"] >= 1


# From this many rows on, w8a8 runs on the AMX int8 tiles (where there are); fewer rows on AVX512-VNNI. Both are bound
# by reading the weights below it (benchmarks/cpu_quant_gemm.py).
W8A8_TILE_ROWS = 5


@dataclass(frozen=True)
class W8A8Panels:
    """A w8a8 (N, K) weight in linear_w8a8.c's layout: panels of 16 output rows (an even number), inputs in fours."""

    packed: torch.Tensor  # int8 (panels, Kp / 4, 16, 4), Kp = K rounded up to 64
    scales: torch.Tensor  # float32 (panels * 16,)
    sums: torch.Tensor    # int32 (panels * 16,): each row's sum of q (VNNI multiplies u8 by s8: it corrects with it)
    in_features: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.sums.nbytes


def pack_w8a8(weight) -> W8A8Panels:
    """A w8a8 `QuantizedWeight` in linear_w8a8.c's layout: packed[p, k // 4, n, k % 4] = q[16 p + n, k], rows past
    N and columns past K zero."""
    q, rows = weight.q, weight.q.shape[0]
    panels = -(-rows // PANEL)
    panels += panels % 2
    depth = -(-weight.in_features // 64) * 64
    padded = torch.zeros(panels * PANEL, depth, dtype=torch.int8)
    padded[:rows, : weight.in_features] = q
    packed = padded.view(panels, PANEL, depth // 4, 4).transpose(1, 2).contiguous()
    scales = torch.zeros(panels * PANEL, dtype=torch.float32)
    scales[:rows] = weight.scales
    sums = padded.sum(dim=1, dtype=torch.int32)
    return W8A8Panels(packed, scales, sums, weight.in_features)


def linear_w8a8(x: torch.Tensor, panels: W8A8Panels, out_features: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) float32 @ W^T (+ bias) for a w8a8 weight `pack_w8a8` laid out, x quantized per row as
    `formats.quantization.quantize_activations` does: (..., out_features) float32, reference_linear's values up to
    float32 rounding of the final scaling."""
    if x.dim() != 2:
        return linear_w8a8(x.reshape(-1, x.shape[-1]), panels, out_features, bias).view(*x.shape[:-1], out_features)
    if x.dtype != torch.float32:
        raise TypeError(f"the w8a8 linear takes float32 activations, got {x.dtype}")
    if x.shape[1] != panels.in_features:
        raise ValueError(f"the w8a8 linear has {panels.in_features} inputs, x has {x.shape[1]}")
    x = x if x.is_contiguous() else x.contiguous()
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    if x.shape[0]:
        _check_linear(_state["lib"].dsserve_linear_w8a8(x.data_ptr(), panels.packed.data_ptr(),
                                                        panels.scales.data_ptr(), panels.sums.data_ptr(),
                                                        0 if bias is None else bias.data_ptr(), out.data_ptr(),
                                                        x.shape[0], out_features, x.shape[1], W8A8_TILE_ROWS),
                      "w8a8", x.shape)
    return out


def linear_w8a8_swiglu(x: torch.Tensor, panels: W8A8Panels, intermediate: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x Wg^T) * (x Wu^T) for a w8a8 (2 I, K) gate_up weight (gate rows first) packed by `pack_w8a8`, I a
    multiple of 16: x (T, K) float32 -> (T, I) float32 (into `out` where given), without the (T, 2 I) product in
    memory on the AMX tiles; the values of `linear_w8a8` followed by `silu_mul` (up to float32 rounding of silu)."""
    if intermediate % PANEL:
        raise ValueError(f"the fused SwiGLU needs an intermediate size that is a multiple of {PANEL}, got {intermediate}")
    if x.dtype != torch.float32:
        raise TypeError(f"the w8a8 linear takes float32 activations, got {x.dtype}")
    x = x if x.is_contiguous() else x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], intermediate, dtype=torch.float32)
    elif out.shape != (x.shape[0], intermediate) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 ({x.shape[0]}, {intermediate}) tensor")
    if x.shape[0]:
        _check_linear(_state["lib"].dsserve_linear_w8a8_swiglu(x.data_ptr(), panels.packed.data_ptr(),
                                                               panels.scales.data_ptr(), panels.sums.data_ptr(),
                                                               out.data_ptr(), x.shape[0], intermediate, x.shape[1],
                                                               W8A8_TILE_ROWS),
                      "w8a8", x.shape)
    return out


def pack_heads_f16(weights: torch.Tensor) -> torch.Tensor:
    """(H, N, K) float32, one (N, K) weight per head, N a multiple of 16 -> (H, N / 16, K, 16) float16 for
    `heads_f16`."""
    if weights.shape[1] % PANEL:
        raise ValueError(f"per-head weights need a multiple of {PANEL} output rows, got {weights.shape[1]}")
    return torch.stack([pack_f16(w) for w in weights])


def heads_f16(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x (T, H, K) float32 -> (T, H, N): y[t, h] = x[t, h] W_h^T for the per-head weights `pack_heads_f16` packed."""
    if not x.is_contiguous():
        x = x.contiguous()
    tokens, heads, k = x.shape
    n = packed.shape[1] * PANEL  # exact: pack_heads_f16 takes whole panels only
    out = torch.empty(tokens, heads, n, dtype=torch.float32)
    _state["lib"].dsserve_heads_f16(x.data_ptr(), packed.data_ptr(), packed[0].numel(), out.data_ptr(), tokens, heads,
                                    n, k)
    return out


class ExpertTable:
    """Every local expert's packed (w13, w2), all float16 (linear_f16's layout), all bfloat16 (linear_bf16's) or all
    int8 / int4 (`QuantPanels`, as their C structs), as two C arrays of pointers for `moe_f16` (fp16 only) and
    `moe_grouped`. Holds the tensors so the pointers stay valid."""

    def __init__(self, w13: list, w2: list, intermediate: int, hidden: int, bf16: bool = False):
        self.tensors = (w13, w2)
        self.quantized = isinstance(w13[0], QuantPanels)
        address = (lambda p: ctypes.addressof(p.struct)) if self.quantized else (lambda t: t.data_ptr())
        self.w13 = (ctypes.c_void_p * len(w13))(*(address(t) for t in w13))
        self.w2 = (ctypes.c_void_p * len(w2))(*(address(t) for t in w2))
        self.num, self.intermediate, self.hidden, self.bf16 = len(w13), intermediate, hidden, bf16

    @property
    def weights_kind(self) -> int:
        """moe_grouped's weights_kind: 0 fp16, 1 bf16, 2 int8 / int4."""
        return 2 if self.quantized else int(self.bf16)


def moe_f16(x: torch.Tensor, weights: torch.Tensor, local_ids: torch.Tensor, table: ExpertTable) -> torch.Tensor:
    """sum over slots s of weights[t, s] * expert local_ids[t, s](x[t]) (SwiGLU), (T, D) float32; ids outside
    [0, table.num) contribute nothing. For a few tokens: every weight is read once per (token, slot)."""
    assert not table.bf16 and not table.quantized, "moe_f16 reads float16 experts"
    x = x if x.is_contiguous() else x.contiguous()
    weights = weights.float().contiguous()
    local_ids = local_ids.long().contiguous()
    tokens, top_k = local_ids.shape
    pairs = tokens * top_k
    out = torch.empty(tokens, table.hidden, dtype=torch.float32)
    scratch = torch.empty(pairs * (3 * table.intermediate + table.hidden), dtype=torch.float32)
    _state["lib"].dsserve_moe_f16(x.data_ptr(), tokens, table.hidden, local_ids.data_ptr(), weights.data_ptr(),
                                  top_k, table.w13, table.w2, table.num, table.intermediate, out.data_ptr(),
                                  scratch.data_ptr())
    return out


def moe_grouped(x: torch.Tensor, weights: torch.Tensor, local_ids: torch.Tensor, table: ExpertTable) -> torch.Tensor:
    """The same sum as `moe_f16` for any number of tokens, grouped by expert (csrc/moe.c): each active expert's
    tokens through one GEMM pair, the same values as the module path (`TorchBackend.experts` over the packed
    experts). (T, D) float32."""
    x = x if x.is_contiguous() else x.contiguous()
    weights = weights.float().contiguous()
    local_ids = local_ids.long().contiguous()
    tokens, top_k = local_ids.shape
    lib = _state["lib"]
    out = torch.empty(tokens, table.hidden, dtype=torch.float32)
    scratch = torch.empty(lib.dsserve_moe_grouped_workspace(tokens, table.hidden, top_k, table.intermediate),
                          dtype=torch.float32)
    status = lib.dsserve_moe_grouped(x.data_ptr(), tokens, table.hidden, local_ids.data_ptr(), weights.data_ptr(),
                                     top_k, table.w13, table.w2, table.num, table.intermediate, table.weights_kind,
                                     out.data_ptr(), scratch.data_ptr())
    if status:
        raise RuntimeError(f"dsserve_moe_grouped failed ({status}) for {tokens} tokens x {top_k} of {table.num} experts")
    return out


# ---- a decoder layer's small ops (elementwise.c); callers check `fused_ops_usable` and fall back to torch ----

def fused_ops_usable(x: torch.Tensor) -> bool:
    """x is a float32 CPU tensor and the library is built: RMSNorm, rotary and silu * up may take the C kernels."""
    return x.dtype == torch.float32 and x.is_cpu and (_state["lib"] if "lib" in _state else library()) is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) float32 -> x / sqrt(mean(x^2) + eps) * weight (contiguous), weight (D,) contiguous float32.

    Called once or twice per layer per step: kept to a few microseconds of Python (no views when x is 2-D)."""
    if x.dim() != 2 or x.stride(1) != 1:
        return rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps).view(x.shape)
    out = torch.empty(x.shape[0], x.shape[1], dtype=torch.float32)
    _state["lib"].dsserve_rms_norm(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), x.shape[0],
                                   x.shape[1], eps)
    return out


def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (T, H, D) float32 (the last dimension contiguous) rotated by the cos/sin (P, D/2) contiguous rows of
    `positions` (T,) int64: a new contiguous (T, H, D) tensor (layers/rotary.py describes the two layouts)."""
    if x.stride(2) != 1:
        x = x.contiguous()
    if positions.dtype != torch.int64 or not positions.is_contiguous():
        positions = positions.long().contiguous()
    tokens, heads, dim = x.shape
    out = torch.empty(tokens, heads, dim, dtype=torch.float32)
    _state["lib"].dsserve_rotary(x.data_ptr(), x.stride(0), x.stride(1), out.data_ptr(), tokens, heads, dim,
                                 positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), interleaved)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (N, 2 I) float32 -> silu(gate) * up (N, I)."""
    if not gate_up.is_contiguous():
        gate_up = gate_up.contiguous()
    rows, inner = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inner, dtype=torch.float32)
    _state["lib"].dsserve_silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, inner)
    return out


def cache_write(cache: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Store entry t = [a[t] | b[t]] at slot slots[t] of `cache` (num_blocks, block_size, *entry) float32 or float16,
    contiguous; a (T, ...) and b (T, ...) float32 with each token's values contiguous, slots (T,) int64. False
    (nothing written) where the kernel cannot: the caller writes with torch. Once per layer per step: kept lean."""
    lib = _state["lib"] if "lib" in _state else library()
    if (lib is None or a.dtype != torch.float32 or b.dtype != torch.float32 or slots.dtype != torch.int64
            or cache.dtype not in (torch.float32, torch.float16)):
        return False
    na, nb, entry = math.prod(a.shape[1:]), math.prod(b.shape[1:]), math.prod(cache.shape[2:])
    if na + nb != entry or not (_rows_dense(a) and _rows_dense(b) and slots.is_contiguous() and cache.is_contiguous()):
        return False
    status = lib.dsserve_cache_write(cache.data_ptr(), entry, cache.dtype == torch.float16, slots.data_ptr(),
                                     a.shape[0], a.data_ptr(), a.stride(0), na, b.data_ptr(), b.stride(0), nb)
    return status == 0


def _rows_dense(x: torch.Tensor) -> bool:
    """Each x[t] is one contiguous run of values (x[t] may sit anywhere in a wider buffer)."""
    expected = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def router_noaux(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int,
                 top_k: int, normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DeepSeek-V3's sigmoid / noaux_tc routing of x (T, D) float32 (elementwise.c describes it): weights (T, k)
    float32 and expert ids (T, k) int64, or None where the kernel does not take this shape (torch then)."""
    return _route("dsserve_router_noaux", x, weight, top_k, bias.data_ptr(), n_group, topk_group, top_k,
                  int(normalize), scale)


def router_softmax(x: torch.Tensor, weight: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                   group_limited: bool, normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DeepSeek-V2's softmax routing of x (T, D) float32, greedy or group-limited (elementwise.c describes it):
    weights (T, k) float32 and expert ids (T, k) int64, or None where the kernel does not take this shape."""
    return _route("dsserve_router_softmax", x, weight, top_k, n_group, topk_group, top_k, int(group_limited),
                  int(normalize), scale)


def _route(kernel: str, x: torch.Tensor, weight: torch.Tensor, top_k: int,
           *args) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Call a router kernel (x, T, D, W, E, *args, out_weights, out_ids): its (weights, ids), or None on status -2."""
    if not x.is_contiguous():
        x = x.contiguous()
    tokens = x.shape[0]
    weights = torch.empty(tokens, top_k, dtype=torch.float32)
    ids = torch.empty(tokens, top_k, dtype=torch.int64)
    status = getattr(_state["lib"], kernel)(x.data_ptr(), tokens, x.shape[1], weight.data_ptr(), weight.shape[0], *args,
                                            weights.data_ptr(), ids.data_ptr())
    return (weights, ids) if status == 0 else None


def packed_weights_unavailable(weight_dtype: torch.dtype) -> str | None:
    """None when there is a kernel for `weight_dtype` packed linear weights (fp16: linear_f16.c, else this torch
    build's FBGEMM; fp32: oneDNN. layers/linear.py packs them), else why not."""
    if weight_dtype == torch.float16:
        if linear_f16_usable():
            return None
        engines = torch.backends.quantized.supported_engines
        if not ("fbgemm" in engines or "x86" in engines) or not hasattr(torch.ops.quantized, "linear_dynamic_fp16"):
            return f"this torch build has no FBGEMM (quantized engines: {', '.join(engines)})"
        return None
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build has no oneDNN"
    if weight_dtype == torch.bfloat16 and not native_bf16():
        return "this CPU has no native bf16 matmul (AMX or AVX512-BF16)"
    return None


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX tiles or AVX512-BF16), so oneDNN's bf16 GEMM beats fp32."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return any(f is not None and f() for f in probe) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ---- a dense decode step's layers in one call (decode_layers.c) ---------------------------------------------------

class _FusedDecoder:
    """What both fused decoders share: the C structs kept alive with the tensors they point into, the step's
    integer inputs coerced once, the scratch grown on demand, and the check that the caches are the ones the
    structs point at."""

    def __init__(self, entry: str, workspace, layer_struct, layers: list[dict], step: ctypes.Structure, heads: int,
                 keep: tuple):
        """entry: the library function, (layers, num_layers, step*) -> status; workspace(lib, batch): the floats of
        scratch a step of `batch` tokens needs (step.tokens already set)."""
        self._entry, self._workspace = entry, workspace
        self._keep = (layers, *keep)
        self.caches = [layer["cache"] for layer in layers]  # the structs point into these very tensors
        self.layers = (layer_struct * len(layers))(*(
            layer_struct(*(_field(layer.get(name)) for name, _ in layer_struct._fields_)) for layer in layers))
        self.num_layers, self.step, self.heads = len(layers), step, heads
        self.work = torch.empty(0, dtype=torch.float32)
        self.threads = torch.get_num_threads()

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
        """x (B, hidden) float32 contiguous, one new token per sequence, updated in place through every layer;
        positions, slots, context_lens (B,) and block_tables (B, max_blocks) int64 (rows may be strided);
        `caches` must be the caches this decoder was built over."""
        if len(caches) != len(self.caches) or any(a is not b for a, b in zip(caches, self.caches)):
            raise RuntimeError("the fused decoder was built over other KV caches; rebuild it (CpuBackend.set_kv_caches)")
        lib, step = _state["lib"], self.step
        batch = x.shape[0]
        if block_tables.dtype != torch.int64 or block_tables.stride(1) != 1:
            block_tables = block_tables.long().contiguous()
        positions, slots, context_lens = (t.long().contiguous() for t in (positions, slots, context_lens))
        chunks = min(self.heads, max(1, -(-self.threads // batch)))  # as paged_decode: every thread gets a task
        step.tokens, step.heads_per_task, step.table_stride = batch, -(-self.heads // chunks), block_tables.stride(0)
        need = self._workspace(lib, batch)
        if self.work.numel() < need:
            self.work = torch.empty(need, dtype=torch.float32)
        step.positions, step.slots = positions.data_ptr(), slots.data_ptr()
        step.tables, step.lens = block_tables.data_ptr(), context_lens.data_ptr()
        step.x, step.work = x.data_ptr(), self.work.data_ptr()
        status = getattr(lib, self._entry)(self.layers, self.num_layers, ctypes.byref(step))
        if status != 0:
            raise RuntimeError(f"the fused decode step failed in a kernel (status {status}); DSSERVE_CPU_KERNELS=0 "
                               "runs the torch path instead")
        return x


def _field(value) -> int | None:
    """A struct field's value: a tensor's address, a C array (of pointers) or struct as such, a number, or NULL for
    None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.data_ptr()
    if isinstance(value, ctypes.Array):
        return ctypes.cast(value, ctypes.c_void_p).value
    if isinstance(value, ctypes.Structure):
        return ctypes.addressof(value)
    return value


class DenseDecoder(_FusedDecoder):
    """Every dense (Llama / Qwen2) decoder layer of a decode step in one C call: RMSNorm, the q/k/v linear, rotary,
    the cache store, attention over the paged cache, o, the residual adds, RMSNorm and the SwiGLU MLP, layer after
    layer, on preallocated scratch (decode_layers.c). The same kernels the module path calls, in the same order:
    the same bits, without ~10 Python-side calls per layer.

    `layers` holds, per layer, the tensors the C struct points at (kept alive here): input_norm, post_norm (D,)
    float32; qkv, o, gate_up, down packed by `pack_f16` (or all by `pack_bf16`: `weights_bf16`; or all int8 / int4
    `QuantPanels` structs: `weights_quant`); qkv_bias, o_bias (or None); cache (blocks, block_size, 2, kv_heads,
    head_dim) float32 or float16, contiguous."""

    def __init__(self, layers: list[dict], *, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                 eps: float, scale: float, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                 weights_bf16: bool = False, weights_quant: bool = False):
        cache = layers[0]["cache"]
        step = _struct("dsserve_dense_step")(
            hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, intermediate=intermediate,
            block_size=cache.shape[1], eps=eps, scale=scale, cache_half=int(cache.dtype == torch.float16),
            interleaved=int(interleaved), weights_bf16=int(weights_bf16), weights_quant=int(weights_quant),
            cos_table=cos.data_ptr(),
            sin_table=sin.data_ptr())
        dims = (hidden, heads, kv_heads, head_dim, intermediate)
        super().__init__("dsserve_dense_decode", lambda lib, batch: lib.dsserve_dense_workspace(batch, *dims),
                         _struct("dsserve_dense_layer"), layers, step, heads, (cos, sin))


class MLADecoder(_FusedDecoder):
    """Every DeepSeek (V3 / R1 routing, MLA attention) decoder layer of a decode step in one C call
    (decode_layers.c: dsserve_mla_decode): RMSNorm, q (with or without the LoRA pair) and kv_a, their norms, rotary,
    the latent-cache store, the absorbed per-head projections around attention over the latent cache, o, then a
    dense MLP or the router, the routed experts and the shared experts. The module path's kernels in its order:
    the same bits.

    `layers`: per layer a dict of the `dsserve_mla_layer` fields (dsserve_kernels.h: tensors, C pointer arrays for
    w13 / w2, None for NULL, the int ffn_intermediate); `dims`: the `dsserve_mla_step` integer and float fields that
    do not change per step."""

    def __init__(self, layers: list[dict], *, cos: torch.Tensor, sin: torch.Tensor, **dims):
        cache = layers[0]["cache"]
        step = _struct("dsserve_mla_step")(block_size=cache.shape[1], cache_half=int(cache.dtype == torch.float16),
                                           cos_table=cos.data_ptr(), sin_table=sin.data_ptr(), **dims)
        super().__init__("dsserve_mla_decode", lambda lib, batch: lib.dsserve_mla_workspace(ctypes.byref(step)),
                         _struct("dsserve_mla_layer"), layers, step, dims["heads"], (cos, sin))


# ---- the C interface, read from csrc/dsserve_kernels.h ------------------------------------------------------------
#
# The header is the one statement of it: each function's ctypes restype/argtypes and each struct's ctypes fields are
# built from its declarations (pycparser, at the first library load: ~30 ms with the import), and the structs'
# layouts are checked against the compiler's own sizeof/offsetof (a table generated into the build) before any
# kernel runs. tests/backends/test_c_interface.py checks the .c definitions against the header.

# The types the header may use, as ctypes. A pointer is c_void_p (a tensor's data_ptr(), a C array, None for
# NULL), except a function argument pointing at a header struct: POINTER(that struct), so ctypes rejects another.
_SCALARS = {"void": None, "bool": ctypes.c_bool, "_Bool": ctypes.c_bool, "int": ctypes.c_int, "float": ctypes.c_float,
            "double": ctypes.c_double, "int8_t": ctypes.c_int8, "int32_t": ctypes.c_int32,
            "int64_t": ctypes.c_int64, "uint8_t": ctypes.c_uint8, "uint16_t": ctypes.c_uint16,
            "uint32_t": ctypes.c_uint32,
            "uint64_t": ctypes.c_uint64, "size_t": ctypes.c_size_t}
# pycparser does not preprocess: the header's #includes are dropped and the typedefs they would bring declared
_PRELUDE = ("typedef _Bool bool; typedef signed char int8_t; typedef int int32_t; typedef long long int64_t; "
            "typedef unsigned char uint8_t; "
            "typedef unsigned short uint16_t; typedef unsigned int uint32_t; typedef unsigned long long uint64_t; "
            "typedef unsigned long size_t;\n")
_PRELUDE_NAMES = frozenset(re.findall(r"(\w+);", _PRELUDE))


class CInterfaceError(RuntimeError):
    """The header does not parse, uses what the binder does not read, or disagrees with the built library."""


@dataclass(frozen=True)
class CInterface:
    """What a header declares, each type spelled as C with the qualifiers normalized ("const uint16_t *const *")."""

    functions: dict[str, tuple[str, tuple[tuple[str, str], ...]]]  # name -> (return type, ((arg name, type), ...))
    structs: dict[str, tuple[tuple[str, str], ...]]                # typedef name -> ((field name, type), ...)


def parse_header(text: str, filename: str = "dsserve_kernels.h") -> CInterface:
    """The functions and typedef'd structs `text` declares (a CInterfaceError where it declares anything else or
    does not parse). Comments and preprocessor lines are dropped (line numbers kept for the errors)."""
    try:
        from pycparser import c_ast, c_parser
    except ImportError as e:
        raise CInterfaceError(f"pycparser is not installed ({e}): pip install 'pycparser>=2.21'") from e
    code = re.sub(r"/\*.*?\*/|//[^\n]*", lambda m: "\n" * m.group().count("\n"), text, flags=re.S)
    code = re.sub(r"^[ \t]*#[^\n]*", "", code, flags=re.M)
    try:
        ast = c_parser.CParser().parse(f'{_PRELUDE}# 1 "{filename}"\n{code}', filename)
    except c_parser.ParseError as e:
        raise CInterfaceError(f"{filename} does not parse: {e}") from e
    functions, structs = {}, {}
    for node in ast.ext:
        if isinstance(node, c_ast.Typedef) and (node.name in _PRELUDE_NAMES or isinstance(
                node.type.type, c_ast.Struct) and node.type.type.decls is None):  # the prelude, an opaque struct
            continue
        if isinstance(node, c_ast.Typedef) and isinstance(node.type, c_ast.TypeDecl) and isinstance(
                node.type.type, c_ast.Struct) and node.type.type.decls:
            structs[node.name] = tuple((field.name, _spell(field.type, node.coord)) for field in node.type.type.decls)
        elif isinstance(node, c_ast.Decl) and isinstance(node.type, c_ast.FuncDecl):
            params = node.type.args.params if node.type.args is not None else []
            args = tuple((param.name, _spell(param.type, param.coord)) for param in params)
            if args == ((None, "void"),):
                args = ()
            functions[node.name] = (_spell(node.type.type, node.coord), args)
        else:
            raise CInterfaceError(f"{node.coord}: the binder reads only function declarations and typedef'd structs")
    return CInterface(functions, structs)


def _spell(node, where) -> str:
    """A declarator's type as C: "const float *", "const uint16_t *const *", "int64_t"."""
    from pycparser import c_ast

    if isinstance(node, c_ast.PtrDecl):
        return f"{_spell(node.type, where)} *{' '.join(node.quals)}".rstrip()
    if isinstance(node, c_ast.TypeDecl) and isinstance(node.type, c_ast.IdentifierType):
        return " ".join([*node.quals, *node.type.names])
    raise CInterfaceError(f"{where}: {type(node).__name__} is not a type the binder reads (scalars, pointers)")


def ctype(spelled: str, structs: dict[str, type[ctypes.Structure]] | None = None):
    """The ctypes type of a C type `_spell` wrote; with `structs`, a pointer to one of them is POINTER(it)."""
    base = spelled.replace("const", " ").split()
    if "*" in base:
        named = [word for word in base if word != "*"]
        if structs is not None and len(named) == 1 and base.count("*") == 1 and named[0] in structs:
            return ctypes.POINTER(structs[named[0]])
        return ctypes.c_void_p
    if len(base) != 1 or base[0] not in _SCALARS:
        raise CInterfaceError(f"the binder has no ctypes type for C type {spelled!r}")
    return _SCALARS[base[0]]


def make_structs(interface: CInterface) -> dict[str, type[ctypes.Structure]]:
    """A ctypes.Structure per header struct, its fields in the header's order (callers fill them by name)."""
    return {name: type(name, (ctypes.Structure,), {"_fields_": [(field, ctype(spelled)) for field, spelled in fields]})
            for name, fields in interface.structs.items()}


def bind(lib: ctypes.CDLL, interface: CInterface, structs: dict[str, type[ctypes.Structure]]) -> None:
    """Set every declared function's restype and argtypes on `lib` (a CInterfaceError for one it lacks)."""
    for name, (restype, args) in interface.functions.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise CInterfaceError(f"the kernel library has no {name} (declared in dsserve_kernels.h): "
                                  "a stale or foreign build") from None
        fn.restype = ctype(restype, structs)
        fn.argtypes = [ctype(spelled, structs) for _, spelled in args]


def layout_mismatches(table, interface: CInterface, structs: dict[str, type[ctypes.Structure]]) -> list[str]:
    """Where the ctypes structs disagree with the compiler's layout: `table(i)` is dsserve_struct_layout (each
    struct's sizeof, then its fields' offsetof, in the header's order; -1 past the end)."""
    problems, i = [], 0
    for name, fields in interface.structs.items():
        cls = structs[name]
        expected = [("sizeof", ctypes.sizeof(cls)), *((field, getattr(cls, field).offset) for field, _ in fields)]
        for what, value in expected:
            compiled = table(i)
            if compiled != value:
                problems.append(f"{name} {what}: {value} in ctypes, {compiled} in C")
            i += 1
    if table(i) != -1:
        problems.append(f"the library's layout table has more than the header's {i} entries (a stale build)")
    return problems


@functools.cache
def c_interface() -> CInterface:
    """dsserve_kernels.h's declarations, parsed once per process."""
    return parse_header(HEADER.read_text())


@functools.cache
def _structs() -> dict[str, type[ctypes.Structure]]:
    return make_structs(c_interface())


def _struct(name: str) -> type[ctypes.Structure]:
    return _structs()[name]


def _bind(lib: ctypes.CDLL) -> None:
    """The header's bindings set on a freshly loaded library, its struct layouts checked against the compiler's."""
    interface, structs = c_interface(), _structs()
    bind(lib, interface, structs)
    problems = layout_mismatches(lib.dsserve_struct_layout, interface, structs)
    if problems:
        raise CInterfaceError("the ctypes structs built from dsserve_kernels.h disagree with the compiled library: "
                              + "; ".join(problems))


def _layout_source() -> str:
    """struct_layout.c, compiled into the library: dsserve_struct_layout over every header struct's sizeof and its
    fields' offsetof (the order layout_mismatches reads)."""
    entries = [f"sizeof({name}), " + "".join(f"offsetof({name}, {field}), " for field, _ in fields)
               for name, fields in c_interface().structs.items()]
    body = "\n    ".join(entries) or "0"
    count = sum(1 + len(fields) for fields in c_interface().structs.values())
    return ("#include <stddef.h>\n#include \"dsserve_kernels.h\"\n\n"
            f"static const int64_t layout[] = {{\n    {body}\n}};\n\n"
            "int64_t dsserve_struct_layout(int64_t i) {\n"
            f"    return i >= 0 && i < {count} ? layout[i] : -1;\n}}\n")
