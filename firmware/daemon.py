"""`rekamd`: the kit daemon.

Start-up: validate the config (exit 78 on any error), load or create the kit identity, open the
store (recovery), start the local API/console and the maintenance loop, then tell systemd READY.
SIGTERM/SIGINT: stop taking work, let a commit in progress finish, close the journal, exit 0
within a few seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from firmware import __version__, config
from firmware.seal import identity
from firmware.store.store import Store, StoreError
from firmware.system import logs
from firmware.system.fsutil import atomic_write
from firmware.system.sdnotify import Notifier, watchdog_interval

log = logging.getLogger("rekamd")

EX_OK, EX_SOFTWARE, EX_CONFIG = 0, 70, config.EX_CONFIG


class Kit:
    """The running kit: configuration, identity, store and the services around them."""

    def __init__(self, cfg: config.Config, sim: bool = False) -> None:
        self.cfg = cfg
        self.sim = sim
        self.stop = threading.Event()
        self.identity = identity.load_or_create(cfg.state_dir)
        self.store = Store(cfg, self.identity)
        self.notifier = Notifier()
        self.threads: list[threading.Thread] = []
        self.api_server: Any = None
        self.api_url = ""
        self.started = time.monotonic()
        self.services: dict[str, Any] = {}  # optional parts (sensor, camera, relay...) by name
        self.hardware: dict[str, Any] = {}
        self.enrollment: Any = None
        self.control: Any = None  # firmware.control.plane.ControlPlane when [control] enabled
        self.exit_code: int | None = None  # set by request_exit(): main() stops and exits with it

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Open the store and start every service; returns when they are up."""
        rep = self.store.open()
        log.info("store open kit_id=%s state_dir=%s records=%s recovered=%d quarantined=%d missing=%d",
                 self.identity.kit_id, self.cfg.state_dir, self.store.j.max_seq(), len(rep.adopted),
                 len(rep.quarantined), len(rep.missing))
        self._start_enrollment()
        self._start_panel()
        self._start_control()
        self._start_api()
        self._spawn("maintenance", self._maintenance_loop)
        self._spawn("usb", self._usb_loop)
        if self.cfg.relay.brokers:  # no brokers: the kit only buffers (SD + stick)
            from firmware.relay.relay import Relay

            self.services["relay"] = Relay(self.store, self.cfg, self.stop)
            self.services["relay"].start()

    def _start_enrollment(self) -> None:
        from firmware.enrollment.dedup import DuplicateChecker, nik_key
        from firmware.enrollment.devices import open_devices
        from firmware.enrollment.operators import Operators, operators_from_config
        from firmware.enrollment.session import EnrollmentService

        cfg = self.cfg
        devices, self.hardware = open_devices(cfg, self.sim, cfg.state_dir)
        sensor = self.hardware["sensor"]
        dedup = DuplicateChecker(self.store.j, nik_key(cfg.state_dir), library_capacity=lambda: sensor.capacity)
        ops = Operators(operators_from_config(cfg.operators.list), cfg.operators.max_failures,
                        cfg.operators.lockout_minutes * 60)
        if not cfg.operators.list:
            log.warning("no operators configured ([operators] list): nobody can sign in to enroll")
        self.enrollment = EnrollmentService(self.store, cfg, ops, dedup, devices)
        self.services["sensor"] = sensor

    def _start_panel(self) -> None:
        if not self.cfg.gpio.enabled:
            return
        from firmware.console.panel_link import PanelLink

        try:
            link = PanelLink(self)
        except Exception as e:  # no GPIO (not a Pi, pins busy): the console still works
            log.error("gpio panel unavailable error=%s", e)
            return
        self.services["panel"] = link
        self._spawn("panel", link.run)

    def _start_control(self) -> None:
        if not self.cfg.control.enabled:
            return
        from firmware.control.plane import ControlPlane

        self.control = ControlPlane(self)
        self.services["control"] = self.control
        self.control.start()

    def request_exit(self, status: int) -> None:
        """Stop the daemon with `status` (control plane: 75 restart for a new config, 76 reboot)."""
        self.exit_code = status

    def _spawn(self, name: str, target: Any) -> None:
        t = threading.Thread(target=self._guarded(name, target), name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _guarded(self, name: str, target: Any) -> Any:
        def run() -> None:
            while not self.stop.is_set():
                try:
                    target()
                    return
                except Exception:
                    # A service thread must never take the daemon down; log and restart it.
                    log.exception("service crashed service=%s; restarting in 2 s", name)
                    self.stop.wait(2)
        return run

    def shutdown(self) -> None:
        """Stop services and close the store (waits for a commit in progress)."""
        self.stop.set()
        self.notifier.stopping()
        if self.control is not None:
            self.control.stop()
        if self.api_server is not None:
            self.api_server.should_exit = True
        for t in self.threads:
            t.join(timeout=3)
        if self.enrollment is not None and self.enrollment.active is not None:
            self.enrollment.active.cancel.set()
        for name in ("sensor", "camera", "simulator"):
            obj = self.hardware.get(name)
            if obj is not None:
                try:
                    obj.close() if hasattr(obj, "close") else obj.stop()
                except Exception as e:
                    log.warning("closing %s failed error=%s", name, e)
        if "relay" in self.services:
            self.services["relay"].close()  # flushes its journal marks: before the store closes
        self.store.close()
        try:
            (self.cfg.state_dir / "api.json").unlink()
        except OSError:
            pass
        log.info("stopped")

    # --- services -----------------------------------------------------------------------

    def _start_api(self) -> None:
        import uvicorn

        from firmware.console.api import create_app

        app = create_app(self)
        server = uvicorn.Server(uvicorn.Config(app, host=self.cfg.api.bind, port=self.cfg.api.port,
                                               log_level="warning", access_log=False, lifespan="off"))
        self.api_server = server
        t = threading.Thread(target=server.run, name="api", daemon=True)
        t.start()
        self.threads.append(t)
        deadline = time.monotonic() + 10
        while not server.started and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            raise RuntimeError(f"console/API could not listen on {self.cfg.api.bind}:{self.cfg.api.port}")
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        self.api_url = f"http://{host}:{port}"
        info = {"url": self.api_url, "pid": os.getpid()}
        # Atomic: a CLI started at the same moment must never read a half-written file.
        atomic_write(self.cfg.state_dir / "api.json", json.dumps(info).encode(), verify=False)
        log.info("console and API listening url=%s", self.api_url)

    def eject_usb(self) -> bool:
        """Flush and release the stick, then unmount it (a real mount point only). False if unmount failed."""
        self.store.eject()
        if not self.cfg.usb.require_mountpoint:
            return True
        from hw import usbstick

        try:
            if usbstick.mounted_at(self.cfg.usb_dir) is None:
                return True  # nothing mounted: nothing to unmount
            return usbstick.eject(self.cfg.usb_dir)
        except Exception as e:
            log.error("usb unmount failed mount=%s error=%s", self.cfg.usb_dir, e)
            return False

    def _usb_loop(self) -> None:
        # USB polling, backfill and purging of acknowledged records. Its own thread: a backfill of
        # thousands of records takes minutes and must not hold up the watchdog keep-alive or status checks.
        while not self.stop.is_set():
            try:
                self.store.poll_usb()
            except Exception:
                log.exception("usb poll failed")
            if self.cfg.store.auto_purge:
                try:
                    self.store.purge_acknowledged()
                except Exception:
                    log.exception("purge of acknowledged records failed")
            self.stop.wait(self.cfg.usb.poll_seconds)

    def _maintenance_loop(self) -> None:
        every = self.cfg.daemon.status_interval_s
        check = self.cfg.usb.poll_seconds
        wd = watchdog_interval()
        tick = min(1.0, check, wd or 1.0)
        next_log = next_wd = next_check = 0.0
        last_level = ""
        while not self.stop.is_set():
            now = time.monotonic()
            if wd and now >= next_wd:
                self.notifier.watchdog()
                next_wd = now + wd
            if self.enrollment is not None:
                self.enrollment.expire_idle()
            if now >= next_check:
                next_check = now + check
                st = self.store.status()
                level = st["guard"]["level"]
                if level != last_level or now >= next_log:  # a change of guard state is logged at once
                    self._log_status(st)
                    next_log = now + every
                last_level = level
            self.stop.wait(tick)

    def _log_status(self, st: dict[str, Any]) -> None:
        rec = st["records"]
        text = (f"{st['guard']['level']}: {rec['stored']['records'] + rec['sent']['records']} unacked, "
                f"lag {st['mirror_lag']['records']}, stick {'yes' if st['stick']['present'] else 'no'}")
        self.notifier.status(text)
        level = logging.WARNING if st["guard"]["level"] != "OK" else logging.INFO
        log.log(level, "status guard=%s reasons=%r stored=%d sent=%d acked=%d quarantined=%d mirror_lag=%d",
                st["guard"]["level"], st["guard"]["reasons"], rec["stored"]["records"], rec["sent"]["records"],
                rec["acked"]["records"], rec["quarantined"]["records"], st["mirror_lag"]["records"])

    def status(self) -> dict[str, Any]:
        """The store's status plus the daemon's own (version, uptime, services)."""
        st = self.store.status()
        st["daemon"] = {"version": __version__, "uptime_s": round(time.monotonic() - self.started, 1),
                        "simulation": self.sim, "pid": os.getpid()}
        for name, svc in self.services.items():
            if hasattr(svc, "status"):
                try:
                    st[name] = svc.status()
                except Exception as e:  # status must always answer
                    st[name] = {"error": str(e)}
        return st


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="rekamd", description="rekam enrollment kit daemon")
    ap.add_argument("--config", default=os.environ.get("REKAM_CONFIG", str(config.DEFAULT_PATH)))
    ap.add_argument("--sim", action="store_true", help="simulation mode: simulated sensor and camera")
    ap.add_argument("--check-config", action="store_true", help="validate the config and exit")
    ap.add_argument("--version", action="version", version=f"rekamd {__version__}")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rekamd`."""
    args = parse_args(argv)
    logs.setup()
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        for p in e.problems:
            log.error("config error file=%s: %s", e.source, p)
        return EX_CONFIG
    logs.setup(cfg.daemon.log_level, cfg.daemon.log_format)
    if args.check_config:
        print(f"{args.config}: ok")
        return EX_OK
    if cfg.control.enabled:  # the local file merged with the fleet's current signed config (firmware/control/plane.py)
        from firmware.control.plane import effective_config

        cfg = effective_config(cfg)
    log.info("starting version=%s config=%s simulation=%s", __version__, Path(args.config).resolve(), args.sim)
    try:
        kit = Kit(cfg, sim=args.sim)
    except (identity.IdentityError, OSError, ValueError) as e:
        log.error("cannot start: %s", e)
        return EX_SOFTWARE
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal received signal=%s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        kit.start()
    except (StoreError, OSError, RuntimeError) as e:
        log.error("cannot start: %s", e)
        kit.shutdown()
        return EX_SOFTWARE
    st = kit.store.status()
    kit.notifier.ready(f"{st['guard']['level']}: ready, console {kit.api_url}")
    log.info("ready kit_id=%s guard=%s console=%s", kit.identity.kit_id, st["guard"]["level"], kit.api_url)
    while not stop.wait(0.5) and kit.exit_code is None:
        pass
    kit.shutdown()
    return kit.exit_code if kit.exit_code is not None else EX_OK


def run() -> None:
    """Console-script entry point: `main()`, then exit without interpreter finalization.

    By then the store is closed (no write can be half done), but a request thread may still be
    inside native code (OpenCV, LiteRT); tearing the interpreter down under it can abort the
    process, so the exit status would lie. Flush the logs and leave directly.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
