"""`make demo`: the whole path on one machine - a local mosquitto, the data center's ingest and a
simulated kit relaying to it - until Ctrl-C.

Everything lives under ./var/demo (broker config, archive) and ./var (the kit, as `make run`).
The kit's records go stored -> sent -> acked -> purged; watch `rekam status` or the console.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VAR = REPO / "var"
DEMO = VAR / "demo"
BIN = REPO / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        print("mosquitto is not installed: apt-get install -y mosquitto", file=sys.stderr)
        return 1
    DEMO.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = DEMO / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    kit_conf = DEMO / "rekam-demo.toml"
    base = (REPO / "config" / "rekam-sim.toml").read_text().replace('"../', '"../../')
    kit_conf.write_text(base + f'\n[relay]\nbrokers = ["mqtt://127.0.0.1:{port}"]\n')
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen([mosquitto, "-c", str(conf)]))
        time.sleep(0.5)
        procs.append(subprocess.Popen([str(BIN / "rekam-fleet"), "ingest", "--broker", f"mqtt://127.0.0.1:{port}",
                                       "--archive", str(DEMO / "archive"), "--tofu"]))
        print(f"demo: broker 127.0.0.1:{port}, archive {DEMO / 'archive'}, console http://127.0.0.1:8470/ "
              f"(REKAM_CONFIG={kit_conf.relative_to(REPO)})", flush=True)
        kit = subprocess.Popen([str(BIN / "rekamd"), "--config", str(kit_conf), "--sim"])
        procs.append(kit)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
