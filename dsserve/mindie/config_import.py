"""MindIE's service config.json -> a `dsserve serve --config` TOML, with the fields that have no equivalent."""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Any

from dsserve.config import is_loopback
from dsserve.errors import ConfigError
from dsserve.options import EngineArgs, ServerArgs, check_option_names, names

_MINDIE_UNMAPPED = {
    "managementIpAddress": "dsserve serves /health and /metrics on its one port",
    "managementPort": "dsserve serves /health and /metrics on its one port",
    "metricsPort": "metrics are on the serving port at /metrics",
    "kmcKsfMaster": "MindIE's key store for encrypted key passwords; dsserve takes an unencrypted key (see tlsPkPwd)",
    "kmcKsfStandby": "MindIE's key store for encrypted key passwords; dsserve takes an unencrypted key (see tlsPkPwd)",
    "openAiSupport": "the OpenAI API is always on",
    "npuDeviceIds": "choose devices with CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES",
    "tokenizerProcessNumber": "tokenization runs in the server process, off the engine thread",
    "multiNodesInferEnabled": "multi-node: run `dsserve serve --rank-table FILE --node-rank K` on every node",
    "interNodeTLSEnabled": "torch.distributed traffic is not encrypted: keep it on a private network",
    "worldSize": "multi-node: the rank table's card count is the tensor-parallel size",
    "cpuMemSize": "dsserve keeps no CPU-side KV swap space",
    "backendType": "dsserve has one backend (PyTorch)",
    "trustRemoteCode": "dsserve never runs code from a checkpoint folder",
    "maxPrefillBatchSize": "continuous batching: prefill and decode share each step's token budget",
    "prefillTimeMsPerReq": "no time-slice policy: every step schedules by token counts",
    "prefillPolicyType": "no time-slice policy: every step schedules by token counts",
    "decodeTimeMsPerReq": "no time-slice policy: every step schedules by token counts",
    "decodePolicyType": "no time-slice policy: every step schedules by token counts",
    "maxIterTimes": "the output limit is each request's max_tokens (default: the rest of the context)",
    "maxPreemptCount": "preemption recomputes and has no cap",
    "supportSelectBatch": "no time-slice policy: every step schedules by token counts",
    "maxQueueDelayMicroseconds": "requests join the next step at once",
    "logFileSize": "log files rotate at 20 MB",
    "logFileNum": "five rotated log files are kept",
    "logPath": "set DSSERVE_LOG_DIR (an environment variable, not a config key)",
    "modelInstanceNumber": "one model per server",
}


def import_mindie(data: dict[str, Any], source: str | os.PathLike | None = None
                  ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """MindIE's config.json -> (dsserve serve options, [(field, why it has no equivalent)]).

    `source`: where that config.json is; MindIE reads relative TLS paths from its install folder, the parent of
    the config's conf/ folder, so they resolve only when the file sits there. HTTPS (ServerConfig.httpsEnabled,
    true unless set false) carries over as ssl_certfile / ssl_keyfile, with ssl_ca_certs and ssl_cert_reqs = 2
    (client certificates required, MindIE's mutual TLS) when a CA is configured. A config whose TLS cannot carry
    over (no cert or key, an encrypted key, paths that do not resolve) is a ConfigError unless it listens on
    loopback only: it never becomes plain HTTP on a network address.
    """
    if not isinstance(data, dict) or not any(k in data for k in ("ServerConfig", "BackendConfig")):
        raise ConfigError("this is not a MindIE service config: it has neither ServerConfig nor BackendConfig")
    server = data.get("ServerConfig") or {}
    backend = data.get("BackendConfig") or {}
    deploy = backend.get("ModelDeployConfig") or data.get("ModelDeployConfig") or {}
    schedule = backend.get("ScheduleConfig") or data.get("ScheduleConfig") or {}
    log = data.get("LogConfig") or {}
    models = deploy.get("ModelConfig") or []
    model = models[0] if models else {}
    out: dict[str, Any] = {}
    unmapped: list[tuple[str, str]] = []

    def take(section: dict, key: str, target: str, convert=lambda v: v) -> None:
        if key in section:
            out[target] = convert(section[key])

    take(server, "ipAddress", "host")
    take(server, "port", "port", int)
    tls, tls_notes = _mindie_tls(server, out.get("host", "127.0.0.1"), source)
    out.update(tls)
    if "maxLinkNum" in server:
        out["max_queued_requests"] = 2 * int(server["maxLinkNum"])  # MindIE queues 2 x maxLinkNum
    take(model, "modelName", "served_model_name")
    take(model, "modelWeightPath", "model")
    if int(model.get("npuMemSize", -1) or -1) > 0:
        out["kv_cache_memory"] = f"{int(model['npuMemSize'])}GiB"
    take(deploy, "maxSeqLen", "max_model_len", int)
    take(deploy, "maxInputTokenLen", "max_input_len", int)
    take(deploy, "truncation", "truncate_input", bool)
    take(schedule, "cacheBlockSize", "block_size", int)
    take(schedule, "maxBatchSize", "max_num_seqs", int)
    take(schedule, "maxPrefillTokens", "max_num_batched_tokens", int)
    multi_node = bool(backend.get("multiNodesInferEnabled"))
    if multi_node:
        take(backend, "multiNodesInferPort", "master_port", int)
    elif int(model.get("worldSize", 1) or 1) > 1:
        out["tensor_parallel_size"] = int(model["worldSize"])
    if "logLevel" in log:
        out["log_level"] = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "warning": "WARNING",
                            "error": "ERROR", "critical": "CRITICAL"}.get(str(log["logLevel"]).lower(), "INFO")
    mapped = {"ipAddress", "port", "maxLinkNum", "modelName", "modelWeightPath", "npuMemSize", "maxSeqLen",
              "maxInputTokenLen", "truncation", "cacheBlockSize", "maxBatchSize", "maxPrefillTokens", "logLevel",
              "ModelConfig", "ModelDeployConfig", "ScheduleConfig"}
    mapped |= {"multiNodesInferPort"} if multi_node else {"worldSize"} if "tensor_parallel_size" in out else set()
    mapped |= {"httpsEnabled", *_MINDIE_TLS_FIELDS} - set(tls_notes)
    for key, why in tls_notes.items():
        if key not in server:  # a default that shaped the result (httpsEnabled absent: true)
            unmapped.append((key, why))
    for section in (server, backend, deploy, schedule, log, model):
        for key in section:
            if key not in mapped:
                unmapped.append((key, tls_notes.get(key) or _mindie_unmapped(key)))
    if len(models) > 1:
        unmapped.append(("ModelConfig[1:]", "one model per server: start one dsserve per model"))
    check_option_names(out, names(EngineArgs) + names(ServerArgs), "the MindIE import")  # the TOML keys serve reads
    return out, unmapped


def to_toml(options: dict[str, Any], notes: list[tuple[str, str]] = ()) -> str:
    """A `dsserve serve --config` file, with the fields that did not carry over as comments."""
    lines = ["# dsserve serve --config FILE (imported from a MindIE config.json)"]
    for key, value in options.items():
        lines.append(f"{key} = {json.dumps(value)}")
    if notes:
        lines += ["", "# MindIE fields with no dsserve equivalent:"]
        lines += [f"#   {field}: {why}" for field, why in notes]
    return "\n".join(lines) + "\n"


_MINDIE_TLS_FIELDS = ("tlsCert", "tlsPk", "tlsPkPwd", "tlsCaPath", "tlsCaFile", "tlsCrl", "tlsCrlPath", "tlsCrlFiles")


def _mindie_tls(server: dict[str, Any], host: str, source: str | os.PathLike | None
                ) -> tuple[dict[str, Any], dict[str, str]]:
    """ServerConfig's HTTPS fields -> (ssl_* serve options, {field: what did not carry over and why})."""
    notes: dict[str, str] = {}
    if not server.get("httpsEnabled", True):
        notes["httpsEnabled"] = "false: dsserve serves plain HTTP too (keep it on 127.0.0.1 or behind a TLS proxy)"
        notes.update({key: "unused: httpsEnabled is false" for key in _MINDIE_TLS_FIELDS if key in server})
        return {}, notes
    install = Path(source).resolve().parent.parent if source and Path(source).resolve().parent.name == "conf" else None
    problems: list[str] = []
    relative: list[str] = []

    def file(value: Any, field_name: str) -> str | None:
        if not isinstance(value, str) or not value:
            return None
        if os.path.isabs(value):
            return value
        if install is None:
            relative.append(f"{field_name} {value!r}")
            return None
        return str(install / value)

    cert, key = file(server.get("tlsCert"), "tlsCert"), file(server.get("tlsPk"), "tlsPk")
    if not server.get("tlsCert") or not server.get("tlsPk"):
        problems.append("tlsCert and tlsPk are not both set")
    if server.get("tlsPkPwd"):
        problems.append(f"the private key is encrypted (tlsPkPwd {server['tlsPkPwd']!r} is a KMC-encrypted "
                        "password only MindIE can read)")
    ca_files = server.get("tlsCaFile") or []
    ca_files = [ca_files] if isinstance(ca_files, str) else list(ca_files)
    # MindIE joins tlsCaPath (a folder, ending in /) and each tlsCaFile name
    ca = file(os.path.join(server.get("tlsCaPath") or "", ca_files[0]), "tlsCaPath + tlsCaFile") if ca_files else None
    if relative:
        problems.append(f"{', '.join(relative)} are relative to MindIE's install folder, which is known only when "
                        "the config.json imported is the one in that folder's conf/")
    if problems:
        why = "; ".join(problems)
        default = " is true" if "httpsEnabled" in server else " is absent: MindIE's default is true"
        if not is_loopback(host):
            raise ConfigError(
                f"this MindIE config serves HTTPS on {host} (ServerConfig.httpsEnabled{default}) but its TLS "
                f"settings cannot carry over to dsserve: {why}. dsserve will not turn it into plain HTTP on a network "
                "address. Fix one: point tlsCert and tlsPk at the certificate and an unencrypted key (openssl pkey "
                "-in KEY -out server.key; chmod 600 server.key) by absolute paths, drop tlsPkPwd and import again; "
                "or set ipAddress to 127.0.0.1 and put a TLS proxy in front; or set httpsEnabled to false if plain "
                f"HTTP on {host} is really meant"
            )
        state = "true" if "httpsEnabled" in server else "absent, so true (MindIE's default)"
        notes["httpsEnabled"] = (f"{state}, but TLS did not carry over ({why}): this config serves plain HTTP, on "
                                 f"loopback {host} only; add ssl_certfile and ssl_keyfile before widening host")
        notes.update({key: "not carried over (see httpsEnabled)" for key in _MINDIE_TLS_FIELDS if key in server})
        return {}, notes
    options: dict[str, Any] = {"ssl_certfile": cert, "ssl_keyfile": key}
    if ca:
        options["ssl_ca_certs"] = ca
        options["ssl_cert_reqs"] = int(ssl.CERT_REQUIRED)  # MindIE verifies clients against its CA: mutual TLS
    else:
        notes["tlsCaFile"] = "no CA file: clients are not asked for a certificate (server-side TLS only)"
    if len(ca_files) > 1:
        notes["tlsCaFile"] = (f"only {ca_files[0]} carried over (ssl_ca_certs is one file): concatenate "
                              f"{', '.join(ca_files)} into one PEM bundle and point ssl_ca_certs at it, or clients "
                              "signed by the other CAs are refused")
    if server.get("tlsCrlFiles") or server.get("tlsCrl"):
        crl = ("revocation lists are not checked: a revoked client certificate the CA signed is still accepted; "
               "rotate the CA to cut a client off, or terminate TLS in a proxy that checks the CRL")
        notes.update({k: crl for k in ("tlsCrl", "tlsCrlPath", "tlsCrlFiles") if k in server})
    return options, notes


def _mindie_unmapped(key: str) -> str:
    if key in _MINDIE_UNMAPPED:
        return _MINDIE_UNMAPPED[key]
    if key.startswith(("managementTls", "metricsTls")):
        return "dsserve serves /health and /metrics on its one port, with that port's TLS (ssl_*)"
    if key.startswith(("interComm", "interNode")):
        return "torch.distributed traffic between ranks is not encrypted: keep it on a private network"
    return "no dsserve equivalent"

