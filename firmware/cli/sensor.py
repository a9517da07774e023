"""`rekam sensor info|capture|simulate`: fingerprint sensor checks for technicians.

    rekam sensor info --port /dev/serial0            model, capacity, templates, baud, packet size
    rekam sensor capture --port /dev/ttyUSB0 --out f.png
    rekam sensor simulate --profile r503 --link /tmp/fp   a simulated sensor until Ctrl-C/SIGTERM
    rekam sensor info --sim                          the same checks against an in-process simulator

Port, baud, password and address default to `[sensor]` of the config (`--config`, $REKAM_CONFIG,
/etc/rekam/rekam.toml, else the defaults).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from firmware.system.i18n import _


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rekam sensor info|capture|simulate`."""
    s = sub.add_parser("sensor", help=_("fingerprint sensor: info, capture an image, run a simulator"))
    ss = s.add_subparsers(dest="sensor_cmd", metavar="CMD")
    ss.required = True

    def link_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--port", help=_("serial port (default [sensor] port, /dev/serial0)"))
        p.add_argument("--baud", type=int, help=_("baud rate tried first (default [sensor] baud)"))
        p.add_argument("--password", type=lambda v: int(v, 0), help=_("module password (default [sensor])"))
        p.add_argument("--address", type=lambda v: int(v, 0), help=_("module address (default [sensor])"))
        p.add_argument("--no-raise", action="store_true", help=_("keep the found baud, do not raise it"))
        p.add_argument("--sim", action="store_true", help=_("run against an in-process simulator instead"))
        p.add_argument("--profile", choices=["r307", "r503"], help=_("simulated model with --sim"))
        p.add_argument("-v", "--verbose", action="store_true", help=_("log every frame (DEBUG)"))

    p = ss.add_parser("info", help=_("model, capacity, templates stored, baud, packet size"))
    link_args(p)
    p.add_argument("--json", action="store_true", help=_("print JSON"))
    p.set_defaults(func=_info)

    p = ss.add_parser("capture", help=_("wait for a finger and save its image as PNG"))
    link_args(p)
    p.add_argument("--out", required=True, metavar="FILE.png", help=_("where to write the image"))
    p.add_argument("--timeout", type=float, help=_("seconds to wait for a finger (default [sensor])"))
    p.add_argument("--finger", default="demo-000:1", metavar="RESIDENT:N",
                   help=_("with --sim: which simulated finger is placed (corpus:<name>:0 for a corpus print)"))
    p.set_defaults(func=_capture)

    p = ss.add_parser("simulate", help=_("run a simulated sensor on a pseudo-terminal until stopped"))
    p.add_argument("--profile", choices=["r307", "r503"], help=_("model (default [sensor] profile)"))
    p.add_argument("--link", metavar="PATH", help=_("keep a symlink to the pty at PATH"))
    p.add_argument("--corpus", help=_("corpus folder (default [simulation] corpus_dir)"))
    p.add_argument("--library", metavar="FILE.json", help=_("persist the template library (simulated flash)"))
    p.add_argument("--baud", type=int, default=57600, help=_("the module's initial baud (default 57600)"))
    p.add_argument("--password", type=lambda v: int(v, 0), default=0, help=_("module password (default 0)"))
    p.add_argument("--wire-speed", type=float, default=1.0, help=_("1 = real wire timing, 0 = instant"))
    p.add_argument("--no-auto", action="store_true",
                   help=_("do not place and lift fingers on their own (default: demo mode, "
                        "fingers come and go)"))
    p.add_argument("--hold", type=int, default=2, metavar="N",
                   help=_("demo mode: place each finger N times before the next (default 2: a two-impression enrol "
                        "of one finger works)"))
    p.add_argument("-v", "--verbose", action="store_true", help=_("log every command (DEBUG)"))
    p.set_defaults(func=_simulate)


def _config(args: argparse.Namespace) -> Any:
    from firmware.cli.common import load_config

    return load_config(args, optional=True)


def _logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


class _Session:
    """Open the sensor (optionally on an in-process simulator) for one command."""

    def __init__(self, args: argparse.Namespace, cfg: Any) -> None:
        self.args, self.cfg, self.sim = args, cfg, None

    def __enter__(self) -> Any:
        from hw.sensor import FingerprintSensor

        sc = self.cfg.sensor
        port = self.args.port or sc.port
        if self.args.sim:
            from hw.sensor.simulator import SensorSimulator

            self.sim = SensorSimulator(self.args.profile or sc.profile,
                                       corpus_dir=self.cfg.path(self.cfg.simulation.corpus_dir)).start()
            port = self.sim.port
        target = None if self.args.no_raise or not sc.target_baud else sc.target_baud
        self.fp = FingerprintSensor(port, self.args.baud or sc.baud,
                                    password=sc.password if self.args.password is None
                                    else self.args.password,
                                    address=sc.address if self.args.address is None else self.args.address,
                                    target_baud=target)
        try:
            self.fp.open()
        except BaseException:
            self.__exit__()
            raise
        return self.fp

    def __exit__(self, *exc: object) -> None:
        if hasattr(self, "fp"):
            self.fp.close()
        if self.sim is not None:
            self.sim.stop()


def _fail(e: Exception) -> int:
    print("rekam sensor: " + _("sensor error ({kind}): {error}", kind=type(e).__name__, error=e), file=sys.stderr)
    return 1


def _info(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from hw.sensor import SensorError

    _logging(args.verbose)
    cfg = _config(args)  # a ConfigError is reported by `rekam` (exit 78)
    try:
        with _Session(args, cfg) as fp:
            info = fp.info()
    except (SensorError, ValueError) as e:
        return _fail(e)
    if args.json:
        print(json.dumps(dataclasses.asdict(info)))
    else:
        rows = ((_("port:"), info.port), (_("model:"), info.model), (_("image:"), info.geometry),
                (_("capacity:"), info.capacity), (_("templates:"), info.templates), (_("baud:"), info.baud),
                (_("packet size:"), info.packet_size), (_("security:"), info.security_level),
                (_("address:"), f"0x{info.address:08X}"))
        width = max(len(label) for label, _v in rows) + 2
        for label, value in rows:
            print(f"{label:<{width}}{value}")
    return 0


def _capture(args: argparse.Namespace) -> int:
    import time

    import cv2

    from hw.sensor import SensorError

    _logging(args.verbose)
    cfg = _config(args)  # a ConfigError is reported by `rekam` (exit 78)
    try:
        timeout = args.timeout or cfg.sensor.capture_timeout_s
        session = _Session(args, cfg)
        with session as fp:
            if session.sim is not None:
                resident, _sep, n = args.finger.rpartition(":")
                session.sim.present_finger(resident, int(n))
            print(_("place a finger on the sensor (waiting up to {seconds} s)...", seconds=format(timeout, ".0f")),
                  file=sys.stderr)
            t0 = time.monotonic()
            img = fp.capture(timeout=timeout, poll_s=cfg.sensor.poll_interval_s)
    except (SensorError, ValueError) as e:
        return _fail(e)
    if img is None:
        print("rekam sensor: " + _("no finger within {seconds} s", seconds=format(timeout, ".0f")), file=sys.stderr)
        return 2
    if not cv2.imwrite(args.out, img):
        print("rekam sensor: " + _("cannot write {path} (use a .png name in an existing folder)", path=args.out),
              file=sys.stderr)
        return 1
    print(_("{path}: {width}x{height} in {seconds} s", path=args.out, width=img.shape[1], height=img.shape[0],
            seconds=format(time.monotonic() - t0, ".2f")))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import threading

    from firmware.system.signals import SignalLatch
    from hw.sensor.simulator import SensorSimulator

    _logging(args.verbose)
    cfg = _config(args)  # a ConfigError is reported by `rekam` (exit 78)
    corpus = args.corpus or str(cfg.path(cfg.simulation.corpus_dir))
    try:
        sim = SensorSimulator(args.profile or cfg.sensor.profile, corpus_dir=corpus,
                              wire_speed=args.wire_speed,
                              baud=args.baud, password=args.password, library_path=args.library,
                              link=args.link, auto_present=not args.no_auto, auto_repeat=args.hold,
                              finger_conditions=dict(cfg.simulation.finger_conditions))
    except ValueError as e:
        return _fail(e)
    stop = threading.Event()
    latch = SignalLatch()
    sim.start()
    print(sim.port, flush=True)
    if args.link:
        print(f"link: {args.link} -> {sim.port}", file=sys.stderr, flush=True)
    try:
        latch.wait_forever(stop)
    finally:
        sim.stop()
    return 0
