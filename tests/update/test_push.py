"""`rekam-fleet release build|sign|serve|push` against a claimed kit on the real broker: the signed ``update``
command, a real HTTPS download checked against the fleet CA, the bundle waiting for the updater."""

from __future__ import annotations

import hashlib
from pathlib import Path

from firmware import __version__
from firmware.control.files import write_json
from firmware.control.update_fetch import pending_path
from provisioning import release
from provisioning.cli import main as fleet_main
from provisioning.fleet_ops import send_command
from tests.provisioning.conftest import broker, fleet, fleet_and_broker, new_kit, online_kit, service  # noqa: F401
from tests.update.conftest import tiny_wheel


def test_build_sign_serve_push(online_kit, fleet, tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: F811
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    tiny_wheel(wheels, "0.3.0", "sys.exit(1)")
    served = tmp_path / "served"
    served.mkdir()
    bundle = served / "rekam-0.3.0.rkup"
    data = str(fleet.data)
    assert fleet_main(["release", "build", "--wheels", str(wheels), "--version", "0.3.0", "--min-from", "0.1.0",
                       "--out", str(bundle), "--data", data]) == 0
    srv = release.make_server(served, fleet.ca.server_crt, fleet.ca.server_key, "127.0.0.1", 0)
    release.serve_in_thread(srv)
    url = f"https://localhost:{srv.server_address[1]}/"
    kid = online_kit.identity.kit_id
    try:
        # unsigned: the fleet will not even push it
        assert fleet_main(["release", "push", kid, str(bundle), "--url-base", url, "--data", data]) == 1
        assert fleet_main(["release", "sign", str(bundle), "--data", data]) == 0
        capsys.readouterr()
        assert fleet_main(["release", "push", kid, str(bundle), "--url-base", url, "--data", data,
                           "--wait", "20"]) == 0, capsys.readouterr()
        pending = pending_path(online_kit.cfg)
        assert pending.read_bytes() == bundle.read_bytes()
        pending.unlink()
        # a command naming another hash: the download is refused, nothing waits for the updater
        res = send_command(fleet, kid, "update", {"url": url + bundle.name, "sha256": "0" * 64,
                                                  "size": bundle.stat().st_size, "version": "0.3.0"}, 60, 20)
        assert res is not None and not res["ok"] and res["code"] == "hash_mismatch", res
        # a file the server does not have
        res = send_command(fleet, kid, "update", {"url": url + "nope.rkup", "sha256": hashlib.sha256(b"").hexdigest(),
                                                  "size": 10, "version": "0.3.0"}, 60, 20)
        assert res is not None and res["code"] == "download_failed", res
        assert not pending.exists() and not list(pending.parent.glob(".download-*"))
        # the outcome of an update reaches the fleet in telemetry (the state file the root updater writes)
        prefix = tmp_path / "opt"
        (prefix / "update").mkdir(parents=True)
        write_json(prefix / "update" / "state.json", {"state": "idle", "last_result": {
            "version": "0.3.0", "status": "rolled_back", "code": "not_ready", "reason": "exited 1"}})
        monkeypatch.setenv("REKAM_PREFIX", str(prefix))
        res = send_command(fleet, kid, "status", {}, 60, 20)
        assert res is not None and res["data"]["update"]["last_result"]["code"] == "not_ready", res
        assert res["data"]["update"]["running"] == __version__
    finally:
        srv.shutdown()
        srv.server_close()
