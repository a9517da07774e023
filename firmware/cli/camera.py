"""`rekam camera capture --out FILE.jpg [--portrait] [--backend B] [--json]`: take a shot for checks.

Without `--portrait` the raw frame is saved; with it, the full retake loop runs (face quality,
up to `[quality_face] max_attempts` shots) and the ICAO portrait is saved, as enrollment would.
The camera comes from `[camera]` of the config (`--config`, $REKAM_CONFIG, /etc/rekam/rekam.toml,
else the defaults); `--backend`/`--device`/`--sim-folder` override it for a bench test.
"""

from __future__ import annotations

import argparse
from typing import Any

from firmware.system.i18n import _


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rekam camera capture`."""
    c = sub.add_parser("camera", help=_("camera checks: take a shot, optionally through the face-quality loop"))
    cs = c.add_subparsers(dest="camera_cmd", metavar="CMD")
    cs.required = True
    p = cs.add_parser("capture", help=_("capture one frame (or a quality-checked portrait) to a JPEG file"))
    p.add_argument("--out", required=True, metavar="FILE.jpg", help=_("where to write the JPEG"))
    p.add_argument("--portrait", action="store_true", help=_("run the face-quality retake loop, save the portrait"))
    p.add_argument("--backend", choices=["picamera2", "opencv", "sim"], help=_("override [camera] backend"))
    p.add_argument("--device", type=int, help=_("override [camera] device (V4L2 index)"))
    p.add_argument("--sim-folder", help=_("override [camera] sim_folder"))
    p.add_argument("--json", action="store_true", help=_("print the result as JSON"))
    p.set_defaults(func=_capture)


def _config(args: argparse.Namespace) -> Any:
    from firmware.cli.common import load_config

    return load_config(args, optional=True)


def _capture(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from firmware import config
    from hw.camera import CameraError, open_camera

    cfg = _config(args)  # a ConfigError is reported by `rekam` (exit 78)
    thresholds = None
    if args.portrait:
        from firmware.quality.face.assess import FaceThresholds

        try:
            thresholds = FaceThresholds.from_mapping(cfg.quality_face)
        except ValueError as e:  # a rule between [quality_face] keys
            print("rekam camera capture: " + _("camera settings error: {error}", error=e), file=sys.stderr)
            return config.EX_CONFIG
    cam_cfg = dict(cfg.camera)
    for key, val in (("backend", args.backend), ("device", args.device), ("sim_folder", args.sim_folder)):
        if val is not None:
            cam_cfg[key] = val
    corpus_faces = cfg.path(cfg.simulation.corpus_dir) / "faces"
    out = Path(args.out)
    try:
        with open_camera(cam_cfg, sim_folder=corpus_faces) as cam:
            if args.portrait:
                from firmware.quality.face.assess import FaceAssessor
                from firmware.quality.face.capture import capture_face
                from firmware.quality.face.portrait import PortraitSpec

                spec = PortraitSpec(cam_cfg["portrait_width"], cam_cfg["portrait_height"],
                                    cam_cfg["head_height_ratio"])
                res = capture_face(cam, FaceAssessor(thresholds),
                                   portrait=spec, jpeg_quality=cam_cfg["jpeg_quality"],
                                   on_attempt=lambda i, a: None if args.json else print(
                                       _("shot {n}: score={score} codes={codes}", n=i + 1, score=format(a.score, ".1f"),
                                         codes=",".join(a.codes) or "-")))
                out.write_bytes(res.portrait_jpeg)
                result: dict[str, Any] = {"out": str(out), "forced": res.forced, **res.summary}
            else:
                from firmware.quality.face.portrait import encode_jpeg

                frame = cam.capture()
                out.write_bytes(encode_jpeg(frame, cam_cfg["jpeg_quality"]))
                result = {"out": str(out), "size": [frame.shape[1], frame.shape[0]]}
            result["camera"] = cam.health()
    except CameraError as e:
        print("rekam camera capture: " + _("camera error: {error}", error=e), file=sys.stderr)
        return 1
    except OSError as e:
        print("rekam camera capture: " + _("cannot write {path}: {error}", path=out, error=e), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        extra = f" forced={result['forced']}" if "forced" in result else ""
        print(_("wrote {path}{extra} (camera {backend})", path=out, extra=extra, backend=result["camera"]["backend"]))
    return 0
