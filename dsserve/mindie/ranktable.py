"""The MindIE rank table format:

    {"version": "1.0", "status": "completed", "server_count": "2",
     "server_list": [{"server_id": NODE_IP, "container_ip": IP,
                      "device": [{"device_id": "0", "device_ip": CARD_IP, "rank_id": "0"}, ...]}, ...]}

server_list[0] is the master; device_id is local to its node, in [0, cards per node); rank_id is global,
in [0, total cards), contiguous. A wrong value hangs MindIE's start-up silently; here it is an error line.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from dsserve.errors import ConfigError


def generate(nodes: list[str], devices_per_node: int, device_ips: dict[str, list[str]] | None = None,
             container_ips: dict[str, str] | None = None) -> dict[str, Any]:
    if not nodes:
        raise ConfigError("--nodes needs at least one IP (the master first)")
    if devices_per_node < 1:
        raise ConfigError("--devices-per-node must be >= 1")
    for ip in nodes:
        _check_ip(ip, "--nodes")
    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"--nodes lists a node twice: {nodes}")
    servers = []
    for k, node in enumerate(nodes):
        cards = (device_ips or {}).get(node) or [node] * devices_per_node
        if len(cards) != devices_per_node:
            raise ConfigError(f"--device-ips gives {len(cards)} card IPs for {node}; --devices-per-node is {devices_per_node}")
        servers.append({
            "server_id": node,
            "container_ip": (container_ips or {}).get(node, node),
            "device": [{"device_id": str(d), "device_ip": cards[d], "rank_id": str(k * devices_per_node + d)}
                       for d in range(devices_per_node)],
        })
    return {"version": "1.0", "status": "completed", "server_count": str(len(nodes)), "server_list": servers}


def read_device_ips(path: str | Path) -> dict[str, list[str]]:
    """Lines `NODE_IP CARD0_IP CARD1_IP ...` (the card IPs as `hccn_tool -i N -ip -g` reports them)."""
    table: dict[str, list[str]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0].startswith("#"):
            continue
        for ip in fields:
            _check_ip(ip, f"{path}:{number}")
        table[fields[0]] = fields[1:]
    return table


def validate(table: Any) -> list[str]:
    """Every problem, each with its location (`server_list[1].device[3].rank_id: ...`); [] when valid."""
    errors: list[str] = []
    if not isinstance(table, dict):
        return ["the rank table must be a JSON object"]
    if table.get("status") != "completed":
        errors.append(f"status: must be \"completed\", got {table.get('status')!r}")
    if table.get("version") not in ("1.0", "1.2"):
        errors.append(f"version: must be \"1.0\", got {table.get('version')!r}")
    servers = table.get("server_list")
    if not isinstance(servers, list) or not servers:
        return errors + ["server_list: must be a non-empty list of nodes"]
    count = table.get("server_count")
    if str(count) != str(len(servers)):
        errors.append(f"server_count: says {count!r} but server_list has {len(servers)} node(s)")
    seen_nodes: dict[str, str] = {}
    seen_ranks: dict[int, str] = {}
    seen_card_ips: dict[str, str] = {}
    cards_per_node: set[int] = set()
    for i, server in enumerate(servers):
        where = f"server_list[{i}]"
        if not isinstance(server, dict):
            errors.append(f"{where}: must be an object")
            continue
        for key in ("server_id", "container_ip"):
            if key in server or key == "server_id":
                message = _ip_error(server.get(key))
                if message:
                    errors.append(f"{where}.{key}: {message}")
        node = server.get("server_id")
        if node in seen_nodes:
            errors.append(f"{where}.server_id: {node} is already {seen_nodes[node]}")
        seen_nodes.setdefault(node, where)
        devices = server.get("device")
        if not isinstance(devices, list) or not devices:
            errors.append(f"{where}.device: must be a non-empty list of cards")
            continue
        cards_per_node.add(len(devices))
        local_ids: dict[int, str] = {}
        for j, device in enumerate(devices):
            at = f"{where}.device[{j}]"
            if not isinstance(device, dict):
                errors.append(f"{at}: must be an object")
                continue
            local = _int(device.get("device_id"))
            if local is None or not 0 <= local < len(devices):
                errors.append(f"{at}.device_id: {device.get('device_id')!r} must be a local id in [0, {len(devices)})")
            elif local in local_ids:
                errors.append(f"{at}.device_id: {local} is already {local_ids[local]}")
            else:
                local_ids[local] = at
            rank = _int(device.get("rank_id"))
            if rank is None:
                errors.append(f"{at}.rank_id: {device.get('rank_id')!r} is not an integer")
            elif rank in seen_ranks:
                errors.append(f"{at}.rank_id: {rank} is already {seen_ranks[rank]}")
            else:
                seen_ranks[rank] = at
            message = _ip_error(device.get("device_ip"))
            if message:
                errors.append(f"{at}.device_ip: {message}")
            elif device.get("device_ip") in seen_card_ips and device.get("device_ip") not in seen_nodes:
                errors.append(f"{at}.device_ip: {device['device_ip']} is already {seen_card_ips[device['device_ip']]}")
            else:
                seen_card_ips.setdefault(device.get("device_ip"), at)
    total = sum(len(s.get("device") or []) for s in servers if isinstance(s, dict))
    missing = sorted(set(range(total)) - set(seen_ranks))
    if missing:
        errors.append(f"rank_id: ranks must be 0..{total - 1} with none missing; missing {missing[:8]}")
    if seen_ranks.get(0, "").split(".")[0] != "server_list[0]" and 0 in seen_ranks:
        errors.append(f"rank_id: rank 0 (the master) is in {seen_ranks[0]}; the master node must come first")
    if len(cards_per_node) > 1:
        errors.append(f"device: nodes have different card counts {sorted(cards_per_node)}; use the same on every node")
    return errors


def load(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"rank table {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"rank table {path} is not valid JSON (line {e.lineno}: {e.msg})") from None


def environment(table: dict[str, Any], node: str, master_port: int = 29500) -> list[dict[str, str]]:
    """The torch.distributed variables of each process on `node`, one dict per card."""
    errors = validate(table)
    if errors:
        raise ConfigError("the rank table is invalid: " + "; ".join(errors))
    servers = table["server_list"]
    world = sum(len(s["device"]) for s in servers)
    master = servers[0].get("container_ip") or servers[0]["server_id"]
    for server in servers:
        if node in (server["server_id"], server.get("container_ip")):
            return [{"MASTER_ADDR": master, "MASTER_PORT": str(master_port), "WORLD_SIZE": str(world),
                     "RANK": str(int(d["rank_id"])), "LOCAL_RANK": str(int(d["device_id"])),
                     "LOCAL_WORLD_SIZE": str(len(server["device"]))}
                    for d in sorted(server["device"], key=lambda d: int(d["device_id"]))]
    raise ConfigError(f"node {node} is not in the rank table (its nodes: {[s['server_id'] for s in servers]})")


def topology(table: dict[str, Any], node_rank: int) -> dict[str, Any]:
    """Where node `node_rank` (its index in server_list) sits: the ParallelConfig fields of its first process,
    which serves the card with device_id 0 and starts one process for each of the node's other cards."""
    errors = validate(table)
    if errors:
        raise ConfigError("the rank table is invalid: " + "; ".join(errors))
    servers = table["server_list"]
    if not 0 <= node_rank < len(servers):
        raise ConfigError(f"--node-rank {node_rank} is outside the rank table's {len(servers)} node(s) "
                          f"[0, {len(servers) - 1}]; node 0 is {servers[0]['server_id']} (the master)")
    server = servers[node_rank]
    devices = sorted(server["device"], key=lambda d: int(d["device_id"]))
    ranks = tuple(int(d["rank_id"]) for d in devices)
    if node_rank == 0 and ranks[0] != 0:
        raise ConfigError("server_list[0]: rank_id 0 (the master) must be the card with device_id 0")
    return {
        "world_size": sum(len(s["device"]) for s in servers), "rank": ranks[0], "local_rank": 0,
        "node_rank": node_rank, "node_ranks": ranks, "spawn": True,
        "master_addr": servers[0].get("container_ip") or servers[0]["server_id"],
        "node_addr": server.get("container_ip") or server["server_id"],
    }


def _int(value: Any) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def _ip_error(value: Any) -> str | None:
    try:
        ipaddress.ip_address(str(value))
        return None
    except ValueError:
        return f"{value!r} is not an IP address"


def _check_ip(value: str, where: str) -> None:
    message = _ip_error(value)
    if message:
        raise ConfigError(f"{where}: {message}")
