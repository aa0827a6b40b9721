"""The process group as an object: start a node's ranks, meet the others, agree, then run collectives.

Start-up, in order, before a single weight is read:
  1. the first process of a node starts the node's other ranks (`python -m dsserve.runner.worker`);
  2. rank 0 listens on master_addr:master_port (a torch TCPStore bound to that address only) and every
     rank checks in there within --connect-timeout, with a fingerprint: model, config.json hash, dtype,
     parallel sizes, block size, max_model_len, dsserve version, node, host;
  3. rank 0 compares the fingerprints and publishes a verdict: a disagreement names node and rank, and
     every rank stops with it; a rank that never checks in is named too;
  4. torch.distributed's process group (gloo on CPU, nccl on CUDA, hccl with torch_npu) with
     --step-timeout on every collective, so a rank that dies or stalls fails the step instead of hanging.

Each step rank 0 sends the others a two-int header (command, payload length) and the step's inputs as
one int64 tensor (`StepInputs.pack`); while idle it sends a heartbeat often enough that a healthy
worker never times out waiting.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import gc
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dsserve import __version__
from dsserve.config import EngineConfig, ParallelConfig, config_hash
from dsserve.errors import DistributedError
from dsserve.layers.parallel import TensorParallel

logger = logging.getLogger(__name__)

STEP, HEARTBEAT, STOP = 1, 2, 3
WORKER_CONFIG_ENV = "DSSERVE_WORKER_CONFIG"
_AGREE = ("model_type", "config_hash", "dtype", "world_size", "expert_parallel", "block_size", "max_model_len",
          "dsserve")
_LOAD_TIMEOUT_S = 3600.0  # the slowest rank's weight loading, between check-in and the first collective


def backend_for(device: torch.device, override: str | None) -> str:
    if override:
        return override
    if device.type == "cuda":
        return "nccl"
    if device.type == "npu":
        return "hccl"
    return "gloo"


class Distributed:
    """This process's rank in the deployment; `tp` is what the layers use."""

    def __init__(self, config: EngineConfig, device: torch.device):
        self.engine_config = config
        self.config: ParallelConfig = config.parallel
        self.rank, self.world_size = self.config.rank, self.config.world_size
        self.device = device
        self.backend = backend_for(device, self.config.backend)
        self.children: list[tuple[int, subprocess.Popen]] = []
        self.store: dist.TCPStore | None = None
        self.control_group = None  # rank 0's commands: gloo (the default group, or its own on NCCL/HCCL)
        self._stopping = False
        self._closed = False
        self.failed = False  # a collective failed or a rank reported a failure: no STOP can be sent on the way out
        self._listen: socket.socket | None = None
        try:
            self._start()
        except BaseException:
            self.shutdown_children()
            raise
        self.tp = TensorParallel(self.rank, self.world_size, self.config.enable_expert_parallel)

    # ---- start-up ------------------------------------------------------------------------------------

    def _start(self) -> None:
        c = self.config
        if dist.is_initialized():
            gc.collect()  # an engine nobody holds any more, caught in a reference cycle, releases its group now
        if dist.is_initialized():
            raise DistributedError(
                "this process already belongs to a torch.distributed group (another tensor-parallel engine is "
                "running in it); shut that engine down first (`llm.shutdown()`, or `with LLM(...) as llm:`): one "
                "tensor-parallel engine per process at a time"
            )
        _choose_interface(c.node_addr, self.backend)
        if self.rank == 0 and not _agent_store():
            self._listen = _listen(c.master_addr, c.master_port)
            port = self._listen.getsockname()[1]
            if port != c.master_port:
                self.config = dataclasses.replace(c, master_port=port)
                self.engine_config = dataclasses.replace(self.engine_config, parallel=self.config)
        if self.config.spawn and self.rank == self.config.node_ranks[0]:
            self._spawn_node_ranks()
        self.store = self._connect_store()
        self._check_in()
        started = time.monotonic()
        dist.init_process_group(
            self.backend, store=dist.PrefixStore("dsserve/pg", self.store), rank=self.rank,
            world_size=self.world_size, timeout=datetime.timedelta(seconds=self.config.step_timeout_s),
        )
        # Rank 0's commands travel over a CPU (gloo) group: synchronous errors and timeouts even when the model's
        # collectives run on NCCL/HCCL (asynchronous there), and idle ranks wait on a socket, not on the GPU.
        self.control_group = None if self.backend == "gloo" else dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=self.config.step_timeout_s))
        logger.info("rank %d/%d joined the %s process group in %.1fs", self.rank, self.world_size, self.backend,
                    time.monotonic() - started)

    def _spawn_node_ranks(self) -> None:
        c = self.config
        for local_rank, rank in enumerate(c.node_ranks[1:], start=1):
            child = dataclasses.replace(self.engine_config, parallel=dataclasses.replace(
                c, rank=rank, local_rank=local_rank, spawn=False))
            env = {**os.environ, WORKER_CONFIG_ENV: child.to_json(), "DSSERVE_PARENT_PID": str(os.getpid())}
            proc = subprocess.Popen([sys.executable, "-m", "dsserve.runner.worker"], env=env)
            self.children.append((rank, proc))
            logger.info("started rank %d (pid %d)", rank, proc.pid)

    def _connect_store(self) -> dist.TCPStore:
        c = self.config
        timeout = datetime.timedelta(seconds=c.connect_timeout_s)
        try:
            if self._listen is not None:
                store = dist.TCPStore(c.master_addr, c.master_port, self.world_size, True, timeout,
                                      wait_for_workers=False, master_listen_fd=self._listen.fileno())
                # The store's server now owns the descriptor and closes it when it goes: closing it here too
                # would close whatever socket reuses that number next (a later engine's listening socket).
                self._listen.detach()
                self._listen = None
                return store
            return dist.TCPStore(c.master_addr, c.master_port, self.world_size, False, timeout)
        except (RuntimeError, dist.DistStoreError) as e:
            raise DistributedError(
                f"rank {self.rank} (node {c.node_rank}) could not reach rank 0 at {c.master_addr}:{c.master_port} "
                f"within {c.connect_timeout_s:.0f}s ({e}); check that node 0 is started, that the address is "
                "node 0's (the rank table's first server / MASTER_ADDR) and that the port is open between the nodes"
            ) from e

    def _fingerprint(self) -> dict:
        e = self.engine_config
        return {
            "rank": self.rank, "node": self.config.node_rank, "host": socket.gethostname(), "pid": os.getpid(),
            "model": e.model.path, "model_type": e.model.model_type, "config_hash": config_hash(e.model.path),
            "dtype": e.dtype, "weight_dtype": e.weight_dtype, "kv_cache_dtype": e.kv_cache_dtype,
            "world_size": self.world_size,
            "expert_parallel": self.config.enable_expert_parallel,
            "block_size": e.cache.block_size, "max_model_len": e.scheduler.max_model_len, "dsserve": __version__,
        }

    def _check_in(self) -> None:
        store, mine = self.store, self._fingerprint()
        store.set(f"dsserve/hello/{self.rank}", json.dumps(mine))
        if self.rank == 0:
            verdict = self._judge(mine)
            store.set("dsserve/verdict", verdict or "ok")
            if verdict:
                raise DistributedError(verdict)
        else:
            try:
                store.wait(["dsserve/verdict"], datetime.timedelta(seconds=self.config.connect_timeout_s))
            except (RuntimeError, dist.DistStoreError) as e:
                raise DistributedError(
                    f"rank {self.rank} checked in with rank 0 but got no go-ahead within "
                    f"{self.config.connect_timeout_s:.0f}s: another rank did not join (see rank 0's log)"
                ) from e
            verdict = store.get("dsserve/verdict").decode()
            if verdict != "ok":
                raise DistributedError(verdict)

    def _judge(self, mine: dict) -> str | None:
        """Rank 0: wait for every rank's fingerprint; the first disagreement or absence as an error message."""
        deadline = time.monotonic() + self.config.connect_timeout_s
        missing = set(range(1, self.world_size))
        while missing:
            missing = {r for r in missing if not self.store.check([f"dsserve/hello/{r}"])}
            dead = [(r, p.returncode) for r, p in self.children if p.poll() is not None]
            if dead:
                return "; ".join(f"rank {r} (started on this node) exited with code {code} before joining"
                                 for r, code in dead) + ": its error is in the log above"
            if missing and time.monotonic() > deadline:
                return (f"rank(s) {', '.join(map(str, sorted(missing)))} of {self.world_size} did not check in at "
                        f"{self.config.master_addr}:{self.config.master_port} within "
                        f"{self.config.connect_timeout_s:.0f}s; start `dsserve serve` on every node (same rank "
                        "table, each with its own --node-rank) or raise --connect-timeout")
            if missing:
                time.sleep(0.05)
        problems = []
        for r in range(1, self.world_size):
            theirs = json.loads(self.store.get(f"dsserve/hello/{r}"))
            diffs = [f"{k} {_short(theirs.get(k))!r} (rank 0: {_short(mine[k])!r})" for k in _AGREE
                     if theirs.get(k) != mine[k]]
            if diffs:
                problems.append(f"rank {r} on node {theirs['node']} ({theirs['host']}, model {theirs['model']}) "
                                f"has {', '.join(diffs)}")
        if problems:
            return ("the ranks disagree before loading weights: " + "; ".join(problems) +
                    ". Every node must run the same dsserve on the same checkpoint (identical config.json) with the "
                    "same --dtype, --block-size, --max-model-len, --tensor-parallel-size and --enable-expert-parallel")
        logger.info("all %d ranks checked in and agree (model %s, config %s)", self.world_size,
                    mine["model_type"], mine["config_hash"][:12])
        return None

    def agree_min(self, key: str, value: int) -> int:
        """The smallest `value` over the ranks (e.g. KV blocks that fit everywhere), through the store. Waits for
        the slowest rank's weight loading; a rank that fails meanwhile (`report_failure`) fails every rank, and
        so does one whose loading heartbeat stops (killed, e.g. by the OOM killer) for `_stall_s()`."""
        self.store.set(f"dsserve/{key}/{self.rank}", str(value))
        keys = [f"dsserve/{key}/{r}" for r in range(self.world_size)]
        deadline = time.monotonic() + _LOAD_TIMEOUT_S
        beats: dict[int, tuple[int, float]] = {}  # rank -> (last heartbeat count seen, when it last changed)
        try:
            while not self.store.check(keys):
                if self.store.check(["dsserve/failed"]):
                    raise DistributedError(self.store.get("dsserve/failed").decode())
                dead = self.dead_children()
                if dead:
                    raise DistributedError(f"rank {self.rank}: {'; '.join(dead)} while loading; its error is above")
                now = time.monotonic()
                for r in range(self.world_size):
                    if self.store.check([keys[r]]):
                        continue
                    count = self.store.add(f"dsserve/alive/{r}", 0)
                    seen, since = beats.get(r, (-1, now))
                    if count != seen:
                        beats[r] = (count, now)
                    elif now - since > _stall_s(self.config):
                        raise DistributedError(
                            f"rank {self.rank}: rank {r} stopped loading its weights (no sign of life for "
                            f"{now - since:.0f}s): its process died or hangs; see that node's log")
                if now > deadline:
                    raise DistributedError(f"rank {self.rank}: not every rank finished loading within "
                                           f"{_LOAD_TIMEOUT_S:.0f}s")
                time.sleep(0.2)
        except (RuntimeError, dist.DistStoreError) as e:
            raise DistributedError(f"rank {self.rank}: lost rank 0's store while waiting for {key} ({e})") from e
        return min(int(self.store.get(k)) for k in keys)

    def loading(self) -> "_LoadingBeat":
        """`with group.loading():` around weight loading: a heartbeat the other ranks watch in `agree_min`."""
        return _LoadingBeat(self.store, f"dsserve/alive/{self.rank}")

    def report_failure(self, error: BaseException) -> None:
        """Tell every rank (through the store) that this one failed, and why."""
        self.failed = True
        try:
            self.store.set("dsserve/failed", f"rank {self.rank} on node {self.config.node_rank} failed: {error}")
        except Exception:  # noqa: BLE001 - the store may be gone too
            pass

    # ---- steps ---------------------------------------------------------------------------------------

    def send(self, command: int, payload: torch.Tensor | None = None) -> None:
        """Rank 0: the next command (and the step's packed inputs) to every other rank."""
        header = torch.tensor([command, 0 if payload is None else payload.numel()], dtype=torch.long)
        self._broadcast(header)
        if payload is not None:
            self._broadcast(payload)

    def receive(self) -> tuple[int, torch.Tensor | None]:
        header = torch.empty(2, dtype=torch.long)
        self._broadcast(header)
        command, length = header.tolist()
        if command != STEP:
            return command, None
        payload = torch.empty(length, dtype=torch.long)
        self._broadcast(payload)
        return command, payload

    def _broadcast(self, tensor: torch.Tensor) -> None:
        try:
            dist.broadcast(tensor, 0, group=self.control_group)
        except Exception as e:  # gloo raises (DistBackendError) on a lost peer or a timeout
            raise self.lost(e) from e

    def lost(self, error: BaseException) -> DistributedError:
        """The message for a failed collective: the cause a rank published, else what this rank knows."""
        self.failed = True
        reported = None
        try:
            if self.store is not None and self.store.check(["dsserve/failed"]):
                reported = self.store.get("dsserve/failed").decode()
        except Exception:  # noqa: BLE001 - rank 0's store may be gone with rank 0
            pass
        # A dead peer's connection resets a moment before its process can be reaped: give a local rank that died
        # a second to show up, so the message names it instead of "died or stalled".
        deadline = time.monotonic() + 1.0
        while True:
            dead = [f"rank {r} (pid {p.pid}) exited with code {p.returncode}"
                    for r, p in self.children if p.poll() is not None]
            if dead or reported or not self.children or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        who = reported or "; ".join(dead) or f"a rank died or stalled for more than {self.config.step_timeout_s:.0f}s"
        return DistributedError(f"rank {self.rank}: lost the other ranks ({who}): {error}")

    def dead_children(self) -> list[str]:
        return [f"rank {r} (pid {p.pid}) exited with code {p.returncode}"
                for r, p in self.children if p.poll() is not None and not self._stopping]

    # ---- shutdown ------------------------------------------------------------------------------------

    def shutdown(self, graceful: bool) -> None:
        """Rank 0: tell the others to stop (when the group is healthy), then make sure the local ranks exit; every
        rank: leave the process group and drop the store, so that another engine can start in this process.
        Runs once: a second call returns at once (by then the process group may be another engine's)."""
        if self._closed:
            return
        self._closed = True
        graceful = graceful and not self.failed and not any(p.poll() is not None for _, p in self.children)
        self._stopping = True
        sent = False
        if graceful and self.rank == 0 and dist.is_initialized():
            try:
                self.send(STOP)
                sent = True
            except DistributedError:
                pass
        self.shutdown_children(wait_s=10.0 if sent else 0.0)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self.control_group = None
        self.store = None  # rank 0's is the rendezvous server: its port is free once the store goes

    def shutdown_children(self, wait_s: float = 0.0) -> None:
        """Wait up to `wait_s` for the local ranks to exit on their own, then terminate (and kill) them."""
        self._stopping = True
        deadline = time.monotonic() + wait_s
        for _, proc in self.children:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for _, proc in self.children:
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._listen is not None:
            self._listen.close()
            self._listen = None


class _LoadingBeat:
    """Adds 1 to a store counter every 2 s from a thread while the block runs (and once at the start)."""

    def __init__(self, store, key: str):
        self.store, self.key = store, key
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsserve-loading-beat", daemon=True)

    def __enter__(self):
        self.store.add(self.key, 1)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            try:
                self.store.add(self.key, 1)
            except Exception:  # noqa: BLE001 - the store is gone: agree_min reports it
                return


def _stall_s(config: ParallelConfig) -> float:
    return max(30.0, config.step_timeout_s)


def _short(value):
    return value[:12] if isinstance(value, str) and len(value) == 64 else value  # sha256 hex -> its prefix


def _agent_store() -> bool:
    """Under torchrun its agent already hosts the store at MASTER_PORT; rank 0 then joins it as a client."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _listen(addr: str, port: int) -> socket.socket:
    """Bind rank 0's rendezvous port on `addr` only (not every interface)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port))
    except OSError as e:
        sock.close()
        raise DistributedError(
            f"rank 0 cannot listen on {addr}:{port} ({e.strerror}); the address must be this node's "
            "(the rank table's first server / MASTER_ADDR) and the port free (--master-port)"
        ) from e
    sock.listen(128)
    return sock


def _choose_interface(addr: str | None, backend: str) -> None:
    """gloo/nccl pick a network interface by hostname unless told; use the one that holds this node's IP."""
    variable = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}.get(backend)
    if not addr or variable is None or os.environ.get(variable):
        return
    name = interface_of(addr)
    if name:
        os.environ[variable] = name
        logger.info("%s=%s (the interface holding %s)", variable, name, addr)


def interface_of(addr: str) -> str | None:
    """The name of the local network interface with IPv4 address `addr`, if any (Linux)."""
    try:
        wanted = socket.inet_aton(addr)
    except OSError:
        return None
    if addr.startswith("127."):
        return "lo" if Path("/sys/class/net/lo").exists() else None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if packed[20:24] == wanted:
                return name
    return None


class Heartbeat:
    """Rank 0, while no step runs: a HEARTBEAT to every rank each `interval_s`, under the lock that steps take.

    A failure (a rank died while idle) is kept in `error` for the next step and reported through `on_failure`.
    """

    def __init__(self, group: Distributed, lock: threading.Lock, interval_s: float):
        self.group, self.lock, self.interval_s = group, lock, interval_s
        self.last = time.monotonic()
        self.error: BaseException | None = None
        self.on_failure = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsserve-heartbeat", daemon=True)
        self._thread.start()

    def touch(self) -> None:
        self.last = time.monotonic()

    def is_current_thread(self) -> bool:
        return self._thread is threading.current_thread()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.interval_s / 2)):
            if time.monotonic() - self.last < self.interval_s:
                continue
            if not self.lock.acquire(blocking=False):
                continue  # a step is running: that is traffic enough
            try:
                if self._stop.is_set():
                    return
                dead = self.group.dead_children()
                if dead:
                    raise DistributedError(f"rank 0: {'; '.join(dead)}")
                self.group.send(HEARTBEAT)
                self.touch()
            except BaseException as e:  # noqa: BLE001
                self.error = e
                logger.error("lost a rank while idle: %s", e)
                if self.on_failure is not None:
                    self.on_failure(e)
                return
            finally:
                self.lock.release()


def release(group: Distributed, heartbeat: Heartbeat | None, lock: threading.Lock) -> None:
    """Stop the heartbeat and the group (rank 0: the other ranks too). A runner's `shutdown` runs it, and so does the
    runner's `weakref.finalize` when the runner is collected or the interpreter exits: it must hold no reference to
    the runner (its weights and KV cache), only to these three."""
    if heartbeat is not None and heartbeat.is_current_thread():
        # The collection that found the runner ran on the heartbeat's own thread, which may hold `lock` mid-send:
        # stopping from here would deadlock, so another thread does it once the heartbeat has let go.
        threading.Thread(target=release, args=(group, heartbeat, lock), name="dsserve-release").start()
        return
    if heartbeat is not None:
        heartbeat.stop()
    with lock:
        group.shutdown(graceful=heartbeat is None or heartbeat.error is None)
