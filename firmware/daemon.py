"""`rekamd`: the kit daemon.

The composition root: it builds every part and wires them together; nothing imports it.
Start-up: validate the config (exit 78 on any error), load or create the kit identity (exit 70 if
it cannot), then start the services in data-path order under one `Supervisor` (store open and
recovery, capture devices and enrollment, USB watcher, relay, control plane, local API/console,
GPIO panel, watchdog/status; exit 70 if one cannot start), then tell systemd READY. A service that
crashes is restarted with backoff. SIGTERM/SIGINT (or the control plane's exit request, 75/76):
stop the services in reverse order (a commit in progress finishes, the journal closes last), exit
within a few seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from firmware import __version__, config
from firmware.errors import HardwareError
from firmware.seal import identity
from firmware.store.store import Store, StoreError
from firmware.system import i18n, logs, memory
from firmware.system.sdnotify import Notifier, watchdog_interval
from firmware.system.service import RUNNING, STOPPED, Supervisor, ThreadService
from firmware.system.signals import SignalLatch, exit_now

if TYPE_CHECKING:
    from firmware.enrollment.session import EnrollmentService

log = logging.getLogger("rekamd")

EX_OK, EX_SOFTWARE = 0, 70  # EX_CONFIG (78) comes from ConfigError.report()
#: After a battery safe stop: systemd must not restart the daemon; the unit powers the Pi off (ExecStopPost).
EX_POWEROFF = 77


class Kit:
    """The running kit: configuration, identity, store and the services around them (the composition root).

    `start()` builds the services and starts them in data-path order under one `Supervisor`
    (store -> enrollment -> USB -> relay -> control -> API -> panel -> watchdog); `shutdown()` stops
    them in reverse on the one stop event `stop`.
    """

    def __init__(self, cfg: config.Config, sim: bool = False) -> None:
        self.cfg = cfg
        self.sim = sim
        self.stop = threading.Event()  # THE stop event: signals, exit requests and shutdown set it
        self.identity = identity.load_or_create(cfg.state_dir)
        self.store = Store(cfg, self.identity)
        self.notifier = Notifier()
        self.api_url = ""
        self.started = time.monotonic()
        self.services: dict[str, Any] = {}  # optional parts (sensor, relay, control, panel) by name, for status
        self.hardware: dict[str, Any] = {}
        self.enrollment: EnrollmentService | None = None
        self.control: Any = None  # firmware.control.plane.ControlPlane when [control] enabled
        self.exit_code: int | None = None  # set by request_exit(): main() stops and exits with it
        self.port = ConsolePort(self)
        self.supervisor: Supervisor | None = None
        self.api: Any = None  # firmware.console.server.ApiServer
        self.poweroff = ""  # set by the power guard (its code): after the clean stop, run [power] shutdown_command
        self.clock: ClockWatcher | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def build(self) -> list[Any]:
        """The services in data-path order (start order; stopped in reverse)."""
        from firmware.console.server import ApiServer
        from firmware.store.service import StoreService, UsbWatcher

        cfg = self.cfg
        self.clock = self.services["clock"] = ClockWatcher(self)
        services: list[Any] = [StoreService(self.store), self.clock]
        if cfg.gnss.enabled:  # before enrollment: the first record already has a fix
            self.services["gnss"] = GnssService(cfg, self.sim)
            services.append(self.services["gnss"])
        services += [EnrollmentStage(self), UsbWatcher(self.store, cfg.usb.poll_seconds, cfg.store.auto_purge)]
        if cfg.relay.brokers:  # no brokers: the kit only buffers (SD + stick)
            from firmware.relay.relay import Relay

            self.services["relay"] = Relay(self.store, cfg, self.stop)
            services.append(self.services["relay"])
        if cfg.control.enabled:
            from firmware.control.plane import ControlPlane

            self.control = self.services["control"] = ControlPlane(self)
            services.append(self.control)
        self.api = ApiServer(self.port, cfg.api.bind, cfg.api.port, cfg.state_dir / "api.json",
                             https_bind=cfg.api.https_bind, https_port=cfg.api.https_port,
                             hostnames=cfg.api.hostnames, max_body=cfg.api.max_body_kb * 1024)
        services.append(self.api)
        if cfg.power.enabled:  # after the API: the kit is up when it starts watching (the simulated day begins)
            services.append(self._power_guard())
        panel = self._panel()
        if panel is not None:
            services.append(panel)
        services.append(StatusWatchdog(self))
        return services

    def _panel(self) -> Any:
        if not self.cfg.gpio.enabled:
            return None
        from firmware.console.panel_link import PanelLink

        try:
            link = PanelLink(self.port, self.cfg.gpio)
        except Exception as e:  # no GPIO (not a Pi, pins busy): the console still works
            log.error("gpio panel unavailable error=%s", e)
            return None
        self.services["panel"] = link
        return link

    def _power_guard(self) -> Any:
        from firmware.enrollment.power import PowerGuard

        def stop_kit(code: str) -> None:
            self.poweroff = code
            self.stop.set()

        def tell_fleet() -> None:
            fn = getattr(self.control, "telemetry_soon", None)
            if callable(fn):  # bounded: a kit without uplink stops at once; one with it says why first
                fn(wait_s=3.0)

        guard = PowerGuard(open_power(self.cfg, self.sim), self.cfg.power, lambda: self.enrollment, stop_kit,
                           tell_fleet, lambda kind, **d: self.store.audit(kind, "kit", **d))
        self.services["power"] = guard
        return guard

    def note_commit(self, record_id: str, seq: int) -> None:
        """A record was sealed: one sealed before the clock was synced awaits its correction."""
        if self.clock is None:
            return
        try:
            row = self.store.record(record_id)
            self.clock.corrections.note(seq, record_id, bool(row.clock_synced) if row is not None else False)
        except Exception as e:  # bookkeeping for the data center: never fails a commit
            log.error("clock correction bookkeeping failed record_id=%s error=%s", record_id, e)

    def start(self) -> None:
        """Build and start every service; returns when they are up (raises if one cannot start)."""
        self.supervisor = Supervisor(self.build(), self.stop)
        self.supervisor.start()
        self.api_url = self.api.url

    def request_exit(self, status: int) -> None:
        """Stop the daemon with `status` (control plane: 75 restart for a new config, 76 reboot)."""
        self.exit_code = status
        self.stop.set()

    def shutdown(self) -> None:
        """Stop the services in reverse order; the store closes last (it waits for a commit in progress)."""
        self.stop.set()
        self.notifier.stopping()
        if self.supervisor is not None:
            self.supervisor.stop()
        try:  # after the store closed: a CLI that finds no api.json knows the daemon is gone. Only ours:
            # a second rekamd that refused to start (state dir in use) must leave the running one's alone.
            if self.api is not None:
                self.api.unpublish()
        except OSError:
            pass
        log.info("stopped")

    # --- what the console may do (through ConsolePort) -----------------------------------

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

    def status(self) -> dict[str, Any]:
        """The store's status plus the daemon's own (version, uptime, supervised services) and each part's."""
        st = self.store.status()
        st["daemon"] = {"version": __version__, "uptime_s": round(time.monotonic() - self.started, 1),
                        "simulation": self.sim, "pid": os.getpid(),
                        "services": self.supervisor.status() if self.supervisor is not None else {}}
        for name, svc in list(self.services.items()):
            if hasattr(svc, "status"):
                try:
                    st[name] = svc.status()
                except Exception as e:  # status must always answer
                    st[name] = {"error": str(e)}
        return st


class ConsolePort:
    """The kit as the console and the panel see it (`firmware.console.port.KitPort`): nothing more."""

    def __init__(self, kit: Kit) -> None:
        self._kit = kit

    @property
    def kit_id(self) -> str:
        return self._kit.identity.kit_id

    @property
    def site(self) -> str:
        return self._kit.cfg.kit.site

    @property
    def simulation(self) -> bool:
        return self._kit.sim

    @property
    def enrollment(self) -> EnrollmentService | None:
        return self._kit.enrollment

    @property
    def sim_aliases(self) -> dict[str, str] | None:
        return self._kit.hardware.get("sim_aliases") if self._kit.sim else None

    def status(self) -> dict[str, Any]:
        return self._kit.status()

    def guard(self) -> dict[str, Any]:
        return self._kit.store.status()["guard"]

    def records(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return [dict(vars(r)) for r in self._kit.store.records(state=state, limit=limit, newest_first=True)]

    def record(self, record_id: str) -> dict[str, Any] | None:
        row = self._kit.store.record(record_id)
        return dict(vars(row)) if row is not None else None

    def audit_events(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._kit.store.audit_events(limit=limit)

    def commit_simulated(self, count: int, operator_id: str, pad_to: int = 0) -> Iterator[dict[str, Any]]:
        from firmware.capture.simulated import SimulatedCapture

        kit = self._kit
        if not kit.sim:
            raise StoreError("simulated commits are only accepted in simulation mode (rekamd --sim)")
        src = SimulatedCapture(kit.cfg.path(kit.cfg.simulation.corpus_dir), pad_to=pad_to)
        for _ in range(count):
            if kit.stop.is_set():
                return  # the daemon is stopping: the caller reports what was committed
            res = kit.store.commit(src.capture(operator_id).encode(), operator_id=operator_id)
            kit.note_commit(res.record_id, res.seq)
            yield res.as_dict()

    def eject_usb(self) -> bool:
        return self._kit.eject_usb()

    def export_usb(self, limit: int | None = None) -> dict[str, Any] | None:
        from firmware.store.journal import LIVE

        store = self._kit.store
        stick = store.notice_stick()  # a stick inserted a moment ago: used now, not after the watcher's next poll
        if stick is None:
            return None
        copied = store.backfill(limit)
        on_stick = stick.record_files()  # what is really on the stick (it may have been wiped elsewhere)
        live = [r for r in store.records() if r.state in LIVE]
        return {"copied": copied, "remaining": sum(1 for r in live if on_stick.get(r.id) != r.size),
                "total": len(live), "stick_id": stick.stick_id}

    def sensor_error(self) -> str:
        return str(getattr(self._kit.services.get("sensor"), "error", "") or "")

    def uplink_connected(self) -> bool:
        relay = self._kit.services.get("relay")
        return relay is not None and hasattr(relay, "status") and relay.status().get("state") == "connected"

    def power_level(self) -> str:
        guard = self._kit.services.get("power")
        return str(getattr(guard, "level", "")) if guard is not None else ""

    def is_stopping(self) -> bool:
        return self._kit.stop.is_set()


# --- the daemon's own services -------------------------------------------------------------


class EnrollmentStage:
    """Capture devices and the enrollment service: opened on start, closed on stop (after the console)."""

    name = "enrollment"

    def __init__(self, kit: Kit) -> None:
        self.kit = kit

    def start(self) -> None:
        """Open the devices (real or simulated) and build the enrollment service."""
        from firmware.enrollment.dedup import DuplicateChecker, nik_key
        from firmware.enrollment.devices import open_devices
        from firmware.enrollment.operators import Operators, operators_from_config
        from firmware.enrollment.session import EnrollmentService

        kit, cfg = self.kit, self.kit.cfg
        devices, kit.hardware = open_devices(cfg, kit.sim, cfg.state_dir)
        sensor = kit.hardware["sensor"]
        dedup = DuplicateChecker(kit.store.j, nik_key(cfg.state_dir), library_capacity=lambda: sensor.capacity)
        ops = Operators(operators_from_config(cfg.operators.list), cfg.operators.max_failures,
                        cfg.operators.lockout_minutes * 60, db_path=cfg.state_dir / "lockout.sqlite")
        if not cfg.operators.list:
            log.warning("no operators configured ([operators] list): nobody can sign in to enroll")
        kit.enrollment = EnrollmentService(kit.store, cfg, ops, dedup, devices)
        gnss = kit.services.get("gnss")
        if gnss is not None and cfg.gnss.record_position:
            kit.enrollment.position = gnss.manifest_position
        kit.enrollment.add_listener(
            lambda event, data: kit.note_commit(data["record_id"], data["seq"]) if event == "committed" else None)
        kit.services["sensor"] = sensor
        kit.services["quality"] = kit.hardware["quality"]  # which quality checks loaded (the update self-test)

    def stop(self) -> None:
        """Cancel an enrollment in progress and close the devices (idempotent)."""
        kit = self.kit
        if kit.enrollment is not None and kit.enrollment.active is not None:
            kit.enrollment.active.cancel.set()
        hardware, kit.hardware = kit.hardware, {}
        for name in ("sensor", "camera", "iris_camera", "iris_quality", "simulator"):
            obj = hardware.get(name)
            if obj is not None:
                try:
                    obj.close() if hasattr(obj, "close") else obj.stop()
                except Exception as e:
                    log.warning("closing %s failed error=%s", name, e)

    def health(self) -> dict[str, Any]:
        return {"state": RUNNING if self.kit.enrollment is not None else STOPPED}


class StatusWatchdog(ThreadService):
    """The systemd keep-alive, the periodic (and on-change) status log and STATUS=, idle operator sign-out.

    Started last and stopped first; never does slow work (the USB watcher has its own thread), so
    the keep-alive keeps its rhythm during a backfill.
    """

    def __init__(self, kit: Kit) -> None:
        self.kit = kit
        self.every = kit.cfg.daemon.status_interval_s
        self.check = kit.cfg.usb.poll_seconds
        self.wd = watchdog_interval()
        super().__init__("watchdog", min(1.0, self.check, self.wd or 1.0))
        self.next_log = self.next_wd = self.next_check = 0.0
        self.last_level = ""

    def tick(self) -> None:
        kit = self.kit
        now = time.monotonic()
        if self.wd and now >= self.next_wd:
            kit.notifier.watchdog()
            self.next_wd = now + self.wd
        if kit.enrollment is not None:
            kit.enrollment.expire_idle()
        if now >= self.next_check:
            self.next_check = now + self.check
            st = kit.store.status()
            level = st["guard"]["level"]
            if level != self.last_level or now >= self.next_log:  # a change of guard state is logged at once
                self.log_status(st)
                self.next_log = now + self.every
            self.last_level = level

    def log_status(self, st: dict[str, Any]) -> None:
        """STATUS= for systemd and one structured status line."""
        rec = st["records"]
        text = (f"{st['guard']['level']}: {rec['stored']['records'] + rec['sent']['records']} unacked, "
                f"lag {st['mirror_lag']['records']}, stick {'yes' if st['stick']['present'] else 'no'}")
        self.kit.notifier.status(text)
        level = logging.WARNING if st["guard"]["level"] != "OK" else logging.INFO
        log.log(level, "status guard=%s reasons=%s stored=%d sent=%d acked=%d quarantined=%d mirror_lag=%d",
                st["guard"]["level"], ",".join(st["guard"].get("codes", [])) or "-",  # codes: the journal is English
                rec["stored"]["records"], rec["sent"]["records"], rec["acked"]["records"],
                rec["quarantined"]["records"], st["mirror_lag"]["records"])


# --- field: clock, GNSS, power (issue #18) ---------------------------------------------------------------------


class ClockWatcher(ThreadService):
    """Reads the clock's synchronisation from chrony every `[gnss] clock_poll_s`, publishes it to the records
    (`firmware.system.clock.set_clock_state`) and issues the signed corrections of records sealed before it."""

    def __init__(self, kit: Kit) -> None:
        from firmware.system.clock import ClockCorrections
        from firmware.wire import clock_correction

        super().__init__("clock", kit.cfg.gnss.clock_poll_s)
        self.kit = kit
        self.command = list(kit.cfg.gnss.chrony_command)
        self.corrections = ClockCorrections(kit.cfg.state_dir / "clock-corrections.json", kit.identity.kit_id,
                                            lambda body: clock_correction.sign(body, kit.identity.signing_key))

    def tick(self) -> None:
        from firmware.system.clock import read_clock_state, set_clock_state

        state = read_clock_state(self.command)
        set_clock_state(state.synced)
        self.corrections.observe(state)
        new = self.corrections.drain()  # this tick's, those noted on commit, those from before a reboot
        for doc in new:
            self.kit.store.audit("clock_correction", "kit", source=doc["source"], reason=doc.get("reason", ""),
                                 segments=[{k: s[k] for k in ("first_seq", "last_seq", "offset_s")}
                                           for s in doc["segments"]])
        fn = getattr(self.kit.control, "telemetry_soon", None)
        if new and callable(fn):
            fn()

    def stop(self) -> None:
        super().stop()
        from firmware.system.clock import set_clock_state

        set_clock_state(None)

    def status(self) -> dict[str, Any]:
        return self.corrections.status()


class GnssService:
    """The position source from `[gnss]` (gpsd, or the simulator) as a service, and what it may tell."""

    name = "gnss"

    def __init__(self, cfg: config.Config, sim: bool) -> None:
        g, s = cfg.gnss, cfg.simulation
        self.report = g.report_position
        if g.backend == "sim":
            from hw.gnss import SimulatedGnss

            self.source: Any = SimulatedGnss(s.gnss_fix, s.gnss_lat, s.gnss_lon)
        else:
            from hw.gnss import GpsdSource

            self.source = GpsdSource(g.host, g.port, g.max_age_s)

    def start(self) -> None:
        self.source.start()

    def stop(self) -> None:
        self.source.stop()

    def health(self) -> dict[str, Any]:
        return {"state": RUNNING}  # no receiver is "no fix", not a failed service

    def manifest_position(self) -> dict[str, Any]:
        """The fix for a sealed manifest (`none` with its reason when there is none)."""
        return self.source.fix().as_dict()

    def status(self) -> dict[str, Any]:
        st = self.source.status()
        if not self.report:  # privacy: the fix type and its quality, not where the kit is
            st = {k: v for k, v in st.items() if k not in ("lat", "lon", "alt_m")}
        return st


def open_power(cfg: config.Config, sim: bool) -> Any:
    """The power monitor from `[power]`; a configured gauge or pin that is not there is logged and reported in
    every reading (the kit still enrolls, blind to its battery)."""
    from hw import power

    p, s = cfg.power, cfg.simulation
    gauge: Any = None
    if p.gauge == "sim":
        gauge = power.SimulatedPower(s.battery_start_percent, s.battery_drain_per_min,
                                     s.power_loss_at_s if s.power_loss_at_s >= 0 else None)
    else:
        try:
            if p.gauge == "max17048":
                gauge = power.Max17048(p.i2c_bus, p.i2c_address or power.MAX17048_ADDR)
            elif p.gauge == "ina219":
                gauge = power.Ina219(p.i2c_bus, p.i2c_address or power.INA219_ADDR, p.ina219_shunt_ohm,
                                     empty_v=p.ina219_empty_v, full_v=p.ina219_full_v)
        except HardwareError as e:  # the kit still enrolls; status and telemetry say the gauge is missing
            log.error("battery gauge unavailable gauge=%s error=%s", p.gauge, e)
            gauge = power.Unavailable(p.gauge, str(e))
    pin = None
    if p.loss_pin >= 0 and not sim:
        try:
            pin = power.PowerLossPin(p.loss_pin, p.loss_active_high)
        except HardwareError as e:
            log.error("power-loss pin unavailable pin=%d error=%s", p.loss_pin, e)
    return power.PowerMonitor(gauge, pin)


def power_off(cfg: config.Config, code: str) -> int:
    """After the safe stop: sync, run `[power] shutdown_command` if one is set, and return `EX_POWEROFF`.

    With the default (no command) the shipped unit powers the Pi off when rekamd exits 77
    (systemd/rekamd.service ExecStopPost, as root): the daemon itself holds no power-off privilege.
    """
    os.sync()  # the store is closed and fsync'd; the SD and the stick's other dirty pages too, before the cut
    cmd = list(cfg.power.shutdown_command)
    if not cmd:
        log.warning("power stop done code=%s; exiting %d (the rekamd unit powers off)", code, EX_POWEROFF)
        return EX_POWEROFF
    import subprocess

    log.warning("power stop done code=%s; running shutdown command=%s", code, " ".join(cmd))
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            log.error("shutdown command failed status=%d stderr=%s", r.returncode, r.stderr.strip()[:300])
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("shutdown command failed error=%s", e)
    return EX_POWEROFF


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
    memory.limit_arenas()  # before any thread: one arena per thread is what makes RSS creep
    logs.setup()
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        return e.report(log=log)
    logs.setup(cfg.daemon.log_level, cfg.daemon.log_format)
    if args.check_config:
        print(f"{args.config}: ok")
        return EX_OK
    if cfg.control.enabled:  # the local file merged with the fleet's current signed config (firmware/control/plane.py)
        from firmware.control.plane import effective_config

        cfg = effective_config(cfg)
    i18n.set_language(cfg.kit.language)  # what operators read from the daemon (receipts, reasons); logs stay English
    log.info("starting version=%s config=%s simulation=%s", __version__, Path(args.config).resolve(), args.sim)
    try:
        kit = Kit(cfg, sim=args.sim)
    except (identity.IdentityError, OSError, ValueError) as e:
        log.error("cannot start: %s", e)
        return EX_SOFTWARE
    latch = SignalLatch()  # SIGTERM/SIGINT set kit.stop from this thread's loop, never from the handler
    try:
        kit.start()
    except (StoreError, OSError, RuntimeError) as e:
        log.error("cannot start: %s", e)
        kit.shutdown()
        return EX_SOFTWARE
    st = kit.store.status()
    kit.notifier.ready(f"{st['guard']['level']}: ready, console {kit.api_url}")
    log.info("ready kit_id=%s guard=%s console=%s", kit.identity.kit_id, st["guard"]["level"], kit.api_url)
    trimmer = memory.Trimmer()
    trimmer.maybe_trim()  # what start-up freed (config, imports, model loading)
    ticks = 0
    while not latch.wait(kit.stop, 0.5):  # signals, the control plane's exit request and shutdown set it
        ticks += 1
        if ticks % 4 == 0:  # every 2 s: give freed frames and read buffers back to the kernel
            trimmer.maybe_trim()
    kit.shutdown()
    if kit.poweroff:  # the store is closed (clean marker written): now the machine may go down
        return power_off(cfg, kit.poweroff)
    return kit.exit_code if kit.exit_code is not None else EX_OK


def run() -> None:
    """Console-script entry point: `main()`, then exit without interpreter finalization.

    By then the store is closed (no write can be half done), but a request thread may still be
    inside native code (OpenCV, LiteRT); tearing the interpreter down under it can abort the
    process, so the exit status would lie. Flush the logs and leave directly.
    """
    exit_now(main())


if __name__ == "__main__":
    run()
