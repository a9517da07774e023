"""Broker shards in the fleet registry: stable assignment (rendezvous hashing, pins), the brokers every signed
config names, rebalancing after a shard is added, concurrent fleet processes on one registry, and a kit that claims
onto its shard and is moved to another one by a config push (real mosquitto shards on the shipped TLS template, the
real fleet service and control plane)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from firmware.errors import FleetError
from firmware.wire import control_protocol as cp
from provisioning import fleet_ops, shards
from provisioning.cli import build_parser
from provisioning.fleet_link import FleetLink
from provisioning.fleet_service import FleetService
from provisioning.registry import Fleet
from tests.provisioning.conftest import make_kit, write_kit_config
from tests.support import REPO, Mosquitto, subprocess_env, wait_for

KIT_IDS = [f"rk-{n:08x}" for n in range(600)]


@pytest.fixture(params=["sqlite", "postgres"])
def registry(request: pytest.FixtureRequest) -> str | None:
    """The fleet registry's backend: None (fleet.db) or the DSN of a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_database")


def _fleet(tmp_path: Path, registry: str | None = None) -> Fleet:
    return Fleet.init(tmp_path / "fleet", ["127.0.0.1:1"], ["127.0.0.1:2"], ["127.0.0.1"], batch="test",
                      registry=registry)


def _approve(f: Fleet, kit_id: str) -> None:
    """A kit row as a claim leaves it (approved); the claim itself is covered by test_claim.py."""
    f.db.execute("INSERT INTO kits (kit_id, public_key, state, claimed_at) VALUES (?, 'x', 'approved', 0)", (kit_id,))


def _sections(doc: bytes) -> tuple[str, dict]:
    body = cp.decode(doc, "config")[0]
    return body["kit_id"], body["sections"]


def test_rendezvous_assignment_is_even_stable_and_moves_only_to_a_new_shard() -> None:
    two = [shards.make_shard("a", ["mqtts://a:8883"]), shards.make_shard("b", ["mqtts://b:8883"])]
    before = {k: shards.assign(k, two) for k in KIT_IDS}
    assert all(a.failover and a.failover != a.primary for a in before.values())
    share = sum(a.primary == "a" for a in before.values()) / len(KIT_IDS)
    assert 0.4 < share < 0.6, share
    assert before == {k: shards.assign(k, list(reversed(two))) for k in KIT_IDS}  # order of the table: irrelevant
    three = two + [shards.make_shard("c", ["mqtts://c:8883"])]
    after = {k: shards.assign(k, three) for k in KIT_IDS}
    moved = [k for k in KIT_IDS if after[k].primary != before[k].primary]
    assert all(after[k].primary == "c" for k in moved), "a kit moved between two old shards"
    assert 0.2 < len(moved) / len(KIT_IDS) < 0.45  # about 1/3: only what the new shard takes
    # Draining a shard moves its kits off; a pin wins over the hash.
    drained = [three[0], shards.Shard("b", ("mqtts://b:8883",), ("b:8883",), "draining"), three[2]]
    assert all(shards.assign(k, drained).primary in ("a", "c") for k in KIT_IDS)
    assert shards.assign(KIT_IDS[0], drained, ("b", "a")).shards == ("b", "a")
    with pytest.raises(FleetError):
        shards.assign("rk-00000000", [shards.Shard("x", ("mqtt://x:1",), (), "retired")])
    assert shards.make_shard("p", ["mqtt://p:1883"]).control == ()  # plain MQTT: no control-plane address
    for bad in (("UPPER", ["mqtt://h:1"]), ("ok", []), ("ok", ["http://h:1"])):
        with pytest.raises(FleetError):
            shards.make_shard(*bad)


def test_every_config_names_the_kits_shards_and_rebalance_moves_only_the_moved(tmp_path: Path,
                                                                               registry: str | None) -> None:
    f = _fleet(tmp_path, registry)
    kits = KIT_IDS[:30]
    for k in kits:
        _approve(f, k)
    # No shard: documents as before (no broker keys), the fleet.json brokers for the fleet's publishes.
    v0, doc = f.make_config(kits[0], {"daemon": {"status_interval_s": 5.0}})
    assert "brokers" not in _sections(doc)[1].get("relay", {}) and f.kit_brokers(kits[0]) == [["127.0.0.1:1"]]
    fleet_ops.add_shard(f, "s1", ["mqtts://h1:8883", "mqtts://h1b:8883"])
    fleet_ops.add_shard(f, "s2", ["mqtts://h2:8883"], control=["h2ctl:8883"])
    with pytest.raises(FleetError):
        fleet_ops.add_shard(f, "s1", ["mqtts://again:8883"])
    # A push to '*' signs one document per kit (same version), each naming its own primary then failover.
    version, _ = f.make_config("*", {"control": {"telemetry_interval_s": 30.0}})
    assert version == v0 + 1
    urls = {"s1": (["mqtts://h1:8883", "mqtts://h1b:8883"], ["h1:8883", "h1b:8883"]),
            "s2": (["mqtts://h2:8883"], ["h2ctl:8883"])}
    for k in kits:
        got_v, doc = f.latest_config(k)
        kit_id, sec = _sections(doc)
        a = f.assignment(k)
        assert (got_v, kit_id, f.assigned(k)) == (version, k, a.shards)
        assert sec["relay"]["brokers"] == urls[a.primary][0] + urls[a.failover][0]
        assert sec["control"] == {"telemetry_interval_s": 30.0, "brokers": urls[a.primary][1] + urls[a.failover][1]}
        assert sec["relay"]["ack_public_keys"] == f.ack_public_keys()  # the other injected key is kept
        assert f.kit_brokers(k) == [urls[n][1] for n in a.shards]
    assert f.moves() == []
    # A third shard: rebalance signs a new version for exactly the kits whose assignment changed, keeping their
    # sections; the others keep theirs.
    fleet_ops.add_shard(f, "s3", ["mqtts://h3:8883"])
    moves = f.moves()
    assert moves and all("s3" in a.shards for _, _, a in moves)
    moved = fleet_ops.rebalance(f, offline=True)
    assert [m[0] for m in moved] == [m[0] for m in moves]
    for k in kits:
        v, doc = f.latest_config(k)
        assert v == (version + 1 if k in {m[0] for m in moved} else version)
        assert _sections(doc)[1]["control"]["telemetry_interval_s"] == 30.0
    assert f.moves() == []
    # A pin: the kit moves with its next push; while moving, the fleet publishes on the old and the new shards.
    k = next(x for x in kits if f.assigned(x)[0] != "s2")
    old = f.kit_brokers(k)
    f.pin(k, "s2", "s3")
    assert [m[0] for m in f.moves()] == [k]
    assert all(lst in f.kit_brokers(k) for lst in old) and ["h2ctl:8883"] in f.kit_brokers(k)
    fleet_ops.rebalance(f, offline=True)
    assert f.assigned(k) == ("s2", "s3") and f.kit_brokers(k) == [["h2ctl:8883"], ["h3:8883"]]
    # The ingest reads the relay brokers of every shard from the registry (no signing key needed).
    every = ["mqtts://h1:8883", "mqtts://h1b:8883", "mqtts://h2:8883", "mqtts://h3:8883"]
    assert shards.relay_brokers_of(registry or f.data) == shards.relay_brokers_of(f.data) == every
    args = build_parser().parse_args(["ingest", "--broker", "mqtt://x:1", "--shards-from", str(f.data),
                                      "--archive", str(tmp_path / "a")])
    from provisioning.ingest import _settings

    assert _settings(args).brokers == ["mqtt://x:1", "mqtts://h1:8883", "mqtts://h1b:8883", "mqtts://h2:8883",
                                       "mqtts://h3:8883"]
    f.close()


PUSHER = """
import sys
from pathlib import Path
from provisioning import fleet_ops
from provisioning.registry import Fleet
f = Fleet(Path(sys.argv[1]))
me, kit, n = sys.argv[4], sys.argv[2], int(sys.argv[3])
for i in range(n):
    v, _ = fleet_ops.push_config(f, kit, [{"x": {f"{me}{i}": i}}], offline=True)
    f.approve(f"{sys.argv[5]}{i:04d}")
    print(v, flush=True)
"""


def test_two_fleet_processes_pushing_and_approving_at_once_lose_nothing(tmp_path: Path, registry: str | None) -> None:
    """Two operators (processes) push to the same kit and approve claims at once: every push gets its own version,
    strictly increasing in each process, none refused, and each builds on the other's (no key lost); every approval
    lands."""
    f = _fleet(tmp_path, registry)
    assert (f.data / "fleet.db").exists() == (registry is None)  # the PostgreSQL registry is the only one
    _approve(f, KIT_IDS[0])
    n = 20
    for who in ("a", "b"):
        for i in range(n):
            f.db.execute("INSERT INTO kits (kit_id, public_key, state, claimed_at) VALUES (?, 'x', 'pending', ?)",
                         (f"rk-pend{who}{i:04d}", int(time.time())))
    fleet_ops.add_shard(f, "s1", ["mqtts://h1:8883"])
    procs = [subprocess.Popen([sys.executable, "-c", PUSHER, str(f.data), KIT_IDS[0], str(n), who, f"rk-pend{who}"],
                              cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for who in ("a", "b")]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append([int(x) for x in out.split()])
    for got in outs:
        assert len(got) == n and got == sorted(set(got)), got
    assert sorted(outs[0] + outs[1]) == list(range(1, 2 * n + 1))
    versions = f.configs(KIT_IDS[0])
    assert [r["version"] for r in versions] == list(range(1, 2 * n + 1))
    last = json.loads(versions[-1]["sections"])["x"]
    assert last == {**{f"a{i}": i for i in range(n)}, **{f"b{i}": i for i in range(n)}}, "a push built on a stale one"
    assert all(r["state"] == "approved" for r in f.kits())
    f.close()


def _shard_broker(tmp_path: Path, name: str) -> Mosquitto:
    return Mosquitto(tmp_path / name, claim_listener=True, persistence=True)


def test_kit_claims_onto_its_shard_is_moved_by_a_push_and_fails_over(tmp_path: Path, registry: str | None) -> None:
    """Two mosquitto shards on the shipped TLS/ACL template; the fleet service listens on both. A kit claims on the
    claim listener, learns its shards from the claim config and connects to its primary; a pin plus push moves it to
    the other shard (the document reaches it on the shard it leaves); its primary killed, it fails over and a
    command still reaches it (the fleet publishes on every shard of the kit)."""
    b1, b2 = _shard_broker(tmp_path, "b1"), _shard_broker(tmp_path, "b2")
    f = Fleet.init(tmp_path / "fleet", [f"127.0.0.1:{b1.port}"], [f"127.0.0.1:{b1.claim_port}"],
                   ["127.0.0.1", "localhost"], batch="test", registry=registry)
    svc = None
    kits = []
    try:
        for b in (b1, b2):
            b.use_shipped(f.ca)
            b.start()
        port = {"s1": b1.port, "s2": b2.port}
        for name in port:
            fleet_ops.add_shard(f, name, [f"mqtts://127.0.0.1:{port[name]}"])
        svc = FleetService(f).start()
        assert len(svc.links) == 2
        root = tmp_path / "kit"
        k = make_kit(root, write_kit_config(root, f, b1))
        kits.append(k)
        kid = k.identity.kit_id
        (f.data / "allowlist.txt").write_text(kid + "\n")
        k.start_control()
        assert k.exited.wait(30), "the claim config (new control brokers) asks for a restart"
        a = f.assignment(kid)
        k2 = k.restart()
        kits.append(k2)
        assert k2.cfg.control.brokers == [f"127.0.0.1:{port[n]}" for n in a.shards]
        assert k2.cfg.relay.brokers == [f"mqtts://127.0.0.1:{port[n]}" for n in a.shards]
        # The config topic of each of its shards holds its current document (retained), not only the claim broker's.
        for n in a.shards:
            got: list[bytes] = []
            lk = FleetLink(f, f"fleet-probe-{n}", lambda _l, m, got=got: got.append(m.payload),
                           (cp.config_topic(kid),), brokers=[f"127.0.0.1:{port[n]}"]).start()
            try:
                wait_for(lambda got=got: got, 10, f"retained config on shard {n}")
            finally:
                lk.close()
            assert cp.decode(got[0], "config")[0]["version"] == 1
        ctl = k2.start_control()
        wait_for(ctl.connected.is_set, 20, "control connected")
        assert ctl.broker == f"127.0.0.1:{port[a.primary]}"
        wait_for(lambda: json.loads(f.kit(kid)["config_state"] or "{}").get("running") == 1, 15,
                 "v1 running, reported")
        # Move it to the other shard alone (a pin), by a push: the document must reach it on the shard it leaves,
        # which its new config no longer names.
        other = a.failover
        assert other is not None
        f.pin(kid, other, None)
        version, published = fleet_ops.push_config(f, kid, [], note="move")
        assert published == 1
        assert k2.exited.wait(20), "the move (new brokers) asks for a restart"
        k3 = k2.restart()
        kits.append(k3)
        assert k3.cfg.control.brokers == [f"127.0.0.1:{port[other]}"]
        assert k3.cfg.relay.brokers == [f"mqtts://127.0.0.1:{port[other]}"]
        ctl3 = k3.start_control()
        wait_for(ctl3.connected.is_set, 20, "control connected after the move")
        assert ctl3.broker == f"127.0.0.1:{port[other]}"
        wait_for(lambda: json.loads(f.kit(kid)["config_state"] or "{}").get("running") == version, 20,
                 "moved config promoted (reported through the new shard)")
        # Back to the hashed assignment (`shards assign --auto`): primary then failover again.
        f.pin(kid, None)
        v2, _ = fleet_ops.push_config(f, kid, [], note="auto")
        assert k3.exited.wait(20)
        k4 = k3.restart()
        kits.append(k4)
        assert k4.cfg.control.brokers == [f"127.0.0.1:{port[n]}" for n in a.shards]
        ctl4 = k4.start_control()
        wait_for(lambda: ctl4.connected.is_set() and ctl4.broker == f"127.0.0.1:{port[a.primary]}", 20,
                 "back on its primary")
        # Its primary dies: the kit fails over; a command still reaches it (the fleet publishes on every shard).
        (b1 if a.primary == "s1" else b2).stop()
        wait_for(lambda: ctl4.connected.is_set() and ctl4.broker == f"127.0.0.1:{port[other]}", 30,
                 "failed over to the failover shard")
        res = fleet_ops.send_command(f, kid, "status", {}, ttl=60, wait=20)
        assert res is not None and res["ok"], res
        wait_for(lambda: json.loads(f.kit(kid)["config_state"] or "{}").get("running") == v2, 20,
                 "reported through the failover shard")
    finally:
        for k in kits:
            try:
                k.stop()
            except Exception:
                pass
        if svc is not None:
            svc.close()
        for b in (b1, b2):
            b.stop()
        f.close()


def test_shards_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], registry: str | None) -> None:
    from provisioning.cli import main

    f = _fleet(tmp_path, registry)
    for k in KIT_IDS[:6]:
        _approve(f, k)
    d = ["--data", str(f.data)]
    assert main(["shards", "list", *d]) == 0
    assert main(["shards", "add", "east", "--broker", "mqtts://east.example:8883", "--host", "east.example", *d]) == 0
    assert (f.data / "shards" / "east" / "mosquitto.conf").exists() and (f.ca.root / "shard-east.crt").exists()
    assert "shard-east.crt" in (f.data / "shards" / "east" / "mosquitto.conf").read_text()
    assert main(["shards", "add", "west", "--broker", "mqtts://west.example:8883", *d]) == 0
    assert main(["shards", "rebalance", "--offline", *d]) == 0
    assert "6" in capsys.readouterr().out
    assert main(["shards", "list", "--json", *d]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["east", "west"] and sum(r["primary_kits"] for r in rows) == 6
    assert main(["shards", "state", "east", "draining", *d]) == 0
    assert main(["shards", "rebalance", "--dry-run", *d]) == 0
    assert capsys.readouterr().out.count("-> west") >= 1
    assert main(["shards", "rebalance", "--offline", *d]) == 0
    assert all(f.assigned(k)[0] == "west" for k in KIT_IDS[:6])
    assert main(["shards", "assign", KIT_IDS[0], "--primary", "east", "--offline", *d]) == 0
    assert f.assigned(KIT_IDS[0]) == ("east",)
    assert main(["shards", "assign", KIT_IDS[0], "--primary", "nowhere", "--offline", *d]) == 1
    f.close()


def test_fleet_publish_reaches_none_is_an_error(tmp_path: Path) -> None:
    f = _fleet(tmp_path)
    _approve(f, KIT_IDS[0])
    dead = f"127.0.0.1:{_free_port()}"
    fleet_ops.add_shard(f, "gone", [f"mqtts://{dead}"])
    t = time.monotonic()
    with pytest.raises(FleetError, match="no broker shard reached"):
        fleet_ops.push_config(f, KIT_IDS[0], [{"control": {"telemetry_interval_s": 9.0}}])
    assert time.monotonic() - t < 30
    f.close()


def _free_port() -> int:
    from tests.support import free_port

    return free_port()
