"""`rekam quality face FILE... [--json]`: judge photos exactly as the kit judges a camera shot.

Thresholds come from `[quality_face]` of the config named by `--config` / $REKAM_CONFIG /
/etc/rekam/rekam.toml when one exists, else the shipped defaults.
Exit status: 0 every photo accepted, 1 at least one rejected, 2 a file could not be read,
3 the face models could not be loaded, 78 a bad config file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from firmware.quality import load_image
from firmware.system.i18n import N_, _, gettext

EX_ACCEPTED, EX_REJECTED, EX_UNREADABLE, EX_MODELS = 0, 1, 2, 3


def _thresholds(args: argparse.Namespace) -> Any:
    from firmware import config
    from firmware.quality.face.assess import FaceThresholds

    path = getattr(args, "config", None) or os.environ.get("REKAM_CONFIG") or None
    if path is None and config.DEFAULT_PATH.exists():
        path = str(config.DEFAULT_PATH)
    if path is None:
        return FaceThresholds()
    cfg = config.load(path)  # ConfigError is reported by run()
    return FaceThresholds.from_mapping(cfg.quality_face)


#: The verdict and severity words of the text output (the --json document keeps the English codes).
VERDICTS = {True: N_("ACCEPT"), False: N_("REJECT")}
SEVERITIES = {"reject": N_("reject"), "warn": N_("warn")}


def _text(path: str, s: dict[str, Any]) -> str:
    from firmware.quality.face.assess import CODES

    verdict = gettext(VERDICTS[s["accepted"]])
    lines = [_("{path}: {verdict} score={score} faces={faces} size={width}x{height}", path=path, verdict=verdict,
               score=format(s['score'], ".1f"), faces=s["faces"], width=s["size"][0], height=s["size"][1])]
    m = s["measures"]
    if m:
        lines.append(
            f"  ied={m['ied_px']:.0f}px yaw={m['yaw_deg']:+.1f} pitch={m['pitch_deg']:+.1f} "
            f"roll={m['roll_deg']:+.1f} eyes={min(m['eye_open_right'], m['eye_open_left']):.2f} "
            f"mouth={m['mouth_open']:.2f} lum={m['luminance_mean']:.2f} "
            f"clip={m['dark_fraction']:.3f}/{m['bright_fraction']:.3f} "
            f"balance={m['illumination_balance']:.2f} sharp={m['sharpness']:.2f}")
    for c in s["codes"]:
        lines.append(f"  {c} ({gettext(SEVERITIES.get(CODES[c][0], CODES[c][0]))}): {gettext(CODES[c][1])}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Assess `args.files`; print text or (with `args.json`) one JSON document. Returns the exit status."""
    from firmware import config
    from firmware.quality.face.assess import FaceAssessor
    from firmware.quality.face.models import ModelError

    try:
        assessor = FaceAssessor(_thresholds(args))
    except config.ConfigError as e:
        return e.report()
    except ValueError as e:  # a rule between [quality_face] keys
        print("rekam quality face: " + _("face quality settings error: {error}", error=e), file=sys.stderr)
        return config.EX_CONFIG
    except ModelError as e:
        print("rekam quality face: " + _("the face models could not be loaded: {error}", error=e), file=sys.stderr)
        return EX_MODELS
    status = EX_ACCEPTED
    results = []
    for f in args.files:
        try:
            img = load_image(f)
        except ValueError as e:
            print(f"rekam quality face: {e}", file=sys.stderr)
            results.append({"file": f, "error": str(e)})
            status = EX_UNREADABLE
            continue
        s = assessor.assess(img).summary()
        results.append({"file": f, **s})
        if not s["accepted"] and status == EX_ACCEPTED:
            status = EX_REJECTED
        if not args.json:
            print(_text(f, s))
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return status
