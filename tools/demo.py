"""`make demo`: the whole path on one machine - a local mosquitto, the data center's ingest and a
simulated kit relaying to it - until Ctrl-C (or, with `--until-delivered`, until its records are delivered).

Everything lives under its own folder, ./var/demo by default (`--root`): the kit's SD and stick, its own
data-center key pair, the broker config and the archive. It never touches ./var/sd, ./var/usb or
./var/datacenter, which belong to `make run`, so a demo cannot relay or purge the user's records.
The kit's console listens on port 8480 (`make run` has 8470), so both can run at once.

Once the kit is up the demo commits `--records` simulated enrollments itself (default 5) and says so;
they go stored -> sent -> acked -> purged. It prints the commands to watch them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO / "var" / "demo"
DEMO_API_PORT = 8480  # `make run` uses 8470
PY = sys.executable  # the venv's python when run by `make demo`: the same code as .venv/bin/rekam*


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*argv: str) -> str:
    return subprocess.run([PY, *argv], check=True, capture_output=True, text=True, cwd=REPO).stdout


def kit_config(root: Path, broker_port: int, ack_key_b64: str, api_port: int) -> Path:
    """The simulation config of `make run` (config/rekam-sim.toml), every path moved under `root`."""
    text = (REPO / "config" / "rekam-sim.toml").read_text()
    corpus = os.path.relpath((REPO / "config" / "../../shared/corpus").resolve(), root)
    moves = {
        'state_dir = "../var/sd"': 'state_dir = "sd"',
        'public_key_files = ["../var/datacenter/datacenter.pub"]': 'public_key_files = ["datacenter/datacenter.pub"]',
        'mount_point = "../var/usb"': 'mount_point = "usb"',
        'corpus_dir = "../../shared/corpus"': f'corpus_dir = {json.dumps(os.environ.get("REKAM_CORPUS") or corpus)}',
        "port = 8470": f"port = {api_port}",
        'site = "simulation"': 'site = "demo"',
    }
    for old, new in moves.items():
        if old not in text:  # the sim config changed: fail loudly rather than share ./var with `make run`
            raise SystemExit(f"demo: config/rekam-sim.toml has no line {old!r}; update tools/demo.py")
        text = text.replace(old, new)
    conf = root / "rekam-demo.toml"
    conf.write_text(f"# Written by tools/demo.py (`make demo`): the kit of the demo, under {root}.\n" + text
                    + f'\n[relay]\nbrokers = ["mqtt://127.0.0.1:{broker_port}"]\nack_public_keys = ["{ack_key_b64}"]\n')
    return conf


def _api(state_dir: Path, pid: int) -> bool:
    try:
        return int(json.loads((state_dir / "api.json").read_text())["pid"]) == pid
    except (OSError, ValueError, KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the demo's own folder (default var/demo)")
    ap.add_argument("--records", type=int, default=5, help="simulated enrollments the demo commits itself")
    ap.add_argument("--api-port", type=int, default=DEMO_API_PORT, help="the kit's console port (0: any free one)")
    ap.add_argument("--until-delivered", action="store_true",
                    help="stop once the records are acknowledged (CI; default: run until Ctrl-C)")
    args = ap.parse_args(argv)
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        print("mosquitto is not installed: apt-get install -y mosquitto", file=sys.stderr)
        return 1
    root = args.root.resolve()
    for d in ("sd", "usb", "archive"):
        (root / d).mkdir(parents=True, exist_ok=True)
    if not (root / "datacenter" / "datacenter.pub").exists():
        _run("-m", "provisioning.cli", "keygen", "--out", str(root / "datacenter"))
    ack_key = _run("-m", "provisioning.cli", "archive", "ack-key", "--archive", str(root / "archive")).strip()
    port = free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    kit_conf = kit_config(root, port, ack_key, args.api_port)
    rekam = [PY, "-m", "firmware.cli", "--config", str(kit_conf)]
    procs: list[subprocess.Popen[bytes]] = []
    status = 0
    try:
        broker_log = open(root / "mosquitto.log", "ab")  # noqa: SIM115 - open for the broker's lifetime
        procs.append(subprocess.Popen([mosquitto, "-c", str(conf)], stdout=broker_log, stderr=subprocess.STDOUT))
        broker_log.close()  # the child has its own copy
        time.sleep(0.5)
        procs.append(subprocess.Popen([PY, "-m", "provisioning.cli", "ingest", "--broker", f"mqtt://127.0.0.1:{port}",
                                       "--archive", str(root / "archive"), "--tofu"], cwd=REPO))
        kit = subprocess.Popen([PY, "-m", "firmware.daemon", "--config", str(kit_conf), "--sim"], cwd=REPO)
        procs.append(kit)
        deadline = time.monotonic() + 60
        while not _api(root / "sd", kit.pid):
            if kit.poll() is not None or time.monotonic() > deadline:
                print("demo: the kit did not start (see its log above)", file=sys.stderr)
                return 1
            time.sleep(0.2)
        url = json.loads((root / "sd" / "api.json").read_text())["url"]
        rel = os.path.relpath(kit_conf, Path.cwd())
        print(f"demo: everything under {root} (not ./var/sd: `make run`'s records are not touched)\n"
              f"demo: broker 127.0.0.1:{port}, archive {root / 'archive'}, kit console {url}/", flush=True)
        if args.records > 0:
            subprocess.run([*rekam, "sim", "commit", str(args.records)], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL)
            print(f"demo: committed {args.records} simulated enrollments; they go stored -> sent -> acked -> purged",
                  flush=True)
        print(f"demo: watch them with  .venv/bin/rekam --config {rel} status   (or: records)\n"
              f"demo: open one with    .venv/bin/rekam-fleet open {root / 'archive'}/records/<kit>/<id>.rkm "
              f"--key {root / 'datacenter' / 'datacenter.key'}\n"
              "demo: Ctrl-C stops it", flush=True)
        delivered = False
        while all(p.poll() is None for p in procs):
            if args.until_delivered and not delivered:
                st = json.loads(subprocess.run([*rekam, "status", "--json"], capture_output=True, text=True,
                                               cwd=REPO).stdout or "{}")
                rec = st.get("records", {})
                if sum(rec.get(s, {}).get("records", 0) for s in ("acked", "purged")) >= args.records:
                    print(f"demo: all {args.records} records delivered to the archive", flush=True)
                    delivered = True
                    break
            time.sleep(0.5)
        if args.until_delivered and not delivered:
            status = 1
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    return status


if __name__ == "__main__":
    sys.exit(main())
