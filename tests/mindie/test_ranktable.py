import copy
import json

import pytest
from typer.testing import CliRunner

from dsserve.cli import app
from dsserve.errors import ConfigError
from dsserve.mindie.ranktable import environment, generate, validate

NODES = ["192.168.1.10", "192.168.1.11"]


@pytest.fixture
def table():
    ips = {n: [f"10.0.{k}.{d}" for d in range(8)] for k, n in enumerate(NODES)}
    return generate(NODES, 8, ips)


def test_generate_validates_and_gives_the_environment(table):
    assert validate(table) == []
    assert table["server_count"] == "2" and table["server_list"][1]["device"][0]["rank_id"] == "8"
    env = environment(table, "192.168.1.11", 29600)
    assert env[3] == {"MASTER_ADDR": "192.168.1.10", "MASTER_PORT": "29600", "WORLD_SIZE": "16", "RANK": "11",
                      "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}
    with pytest.raises(ConfigError, match="not in the rank table"):
        environment(table, "192.168.1.99")


def _broken(table, edit):
    t = copy.deepcopy(table)
    edit(t)
    return validate(t)


@pytest.mark.parametrize("edit,expected", [
    pytest.param(lambda t: t.update(server_count="3"), "server_count: says '3' but server_list has 2", id="count"),
    pytest.param(lambda t: t.update(status="pending"), "status: must be", id="status"),
    pytest.param(lambda t: t["server_list"][1]["device"][2].update(device_id="9"),
                 "server_list[1].device[2].device_id: '9' must be a local id in [0, 8)", id="device-id-range"),
    pytest.param(lambda t: t["server_list"][0]["device"][1].update(device_id="0"),
                 "server_list[0].device[1].device_id: 0 is already server_list[0].device[0]", id="device-id-dup"),
    pytest.param(lambda t: t["server_list"][1]["device"][5].update(rank_id="4"),
                 "server_list[1].device[5].rank_id: 4 is already server_list[0].device[4]", id="rank-dup"),
    pytest.param(lambda t: t["server_list"][1]["device"][7].update(rank_id="16"),
                 "missing [15]", id="rank-gap"),
    pytest.param(lambda t: t["server_list"].reverse(), "rank 0 (the master) is in server_list[1]", id="master-first"),
    pytest.param(lambda t: t["server_list"][0].update(server_id="192.168.1.300"),
                 "server_list[0].server_id: '192.168.1.300' is not an IP address", id="bad-ip"),
    pytest.param(lambda t: t["server_list"][1].update(server_id="192.168.1.10"),
                 "server_list[1].server_id: 192.168.1.10 is already server_list[0]", id="dup-node"),
    pytest.param(lambda t: t["server_list"][1]["device"][1].update(device_ip="10.0.1.0"),
                 "server_list[1].device[1].device_ip: 10.0.1.0 is already server_list[1].device[0]", id="dup-card-ip"),
    pytest.param(lambda t: t["server_list"][1]["device"].pop(), "different card counts", id="uneven"),
    pytest.param(lambda t: t.update(server_list=[]), "server_list: must be a non-empty list", id="empty"),
])
def test_each_error_class_is_caught_with_its_location(table, edit, expected):
    errors = _broken(table, edit)
    assert any(expected in e for e in errors), errors


def test_cli_round_trip(tmp_path):
    ips = tmp_path / "ips.txt"
    ips.write_text("192.168.1.10 10.0.0.1 10.0.0.2\n# comment\n192.168.1.11,10.0.1.1,10.0.1.2\n")
    out = tmp_path / "rank_table.json"
    runner = CliRunner()
    r = runner.invoke(app, ["ranktable", "generate", "--nodes", ",".join(NODES), "--devices-per-node", "2",
                            "--device-ips", str(ips), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["ranktable", "validate", str(out)]).exit_code == 0
    env = runner.invoke(app, ["ranktable", "env", str(out), "--node", "192.168.1.11"])
    assert "RANK=3" in env.output and "WORLD_SIZE=4" in env.output
    data = json.loads(out.read_text())
    data["server_list"][0]["device"][0]["rank_id"] = "1"
    out.write_text(json.dumps(data))
    bad = runner.invoke(app, ["ranktable", "validate", str(out)])
    assert bad.exit_code == 1 and "server_list[0].device[1].rank_id: 1 is already" in bad.output
