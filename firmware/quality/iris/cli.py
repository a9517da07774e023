"""`rekam quality iris FILE... [--json]`: judge NIR eye images exactly as the kit judges an iris shot.

Thresholds come from `[iris]` of the config named by `--config` / $REKAM_CONFIG / /etc/rekam/rekam.toml when one
exists, else the shipped defaults. Exit status: 0 every image accepted, 1 at least one rejected, 2 a file could
not be read, 3 iris-iqm is not installed (the `iris` extra), 78 a bad config file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from firmware.quality import load_image
from firmware.system.i18n import N_, _, gettext

EX_ACCEPTED, EX_REJECTED, EX_UNREADABLE, EX_MISSING = 0, 1, 2, 3
VERDICTS = {True: N_("ACCEPT"), False: N_("REJECT")}


def _settings(args: argparse.Namespace) -> Any:
    from firmware import config
    from firmware.config.models import IrisConfig

    path = getattr(args, "config", None) or os.environ.get("REKAM_CONFIG") or None
    if path is None and config.DEFAULT_PATH.exists():
        path = str(config.DEFAULT_PATH)
    return config.load(path).iris if path else IrisConfig()


def run(args: argparse.Namespace) -> int:
    """Assess `args.files`; print text or (with `args.json`) one JSON document. Returns the exit status."""
    from firmware import config

    try:
        from firmware.quality.iris.assess import CODES, IrisAssessor

        assessor = IrisAssessor(_settings(args))
    except config.ConfigError as e:
        return e.report()
    except ImportError as e:
        print("rekam quality iris: " + _("iris quality is not installed (pip install 'rekam[iris]'): {error}",
                                         error=e), file=sys.stderr)
        return EX_MISSING
    status, results = EX_ACCEPTED, []
    for f in args.files:
        try:
            img = load_image(f, gray=True)
        except ValueError as e:
            print(f"rekam quality iris: {e}", file=sys.stderr)
            results.append({"file": f, "error": str(e)})
            status = EX_UNREADABLE
            continue
        a = assessor.assess(img)
        accepted = not a.rejected
        results.append({"file": f, "accepted": accepted, **a.summary(), "position": a.position})
        if not accepted and status == EX_ACCEPTED:
            status = EX_REJECTED
        if not args.json:
            print(_("{path}: {verdict} score={score}", path=f, verdict=gettext(VERDICTS[accepted]),
                    score=format(a.score, ".0f")))
            if a.measures:
                m = a.measures
                print(f"  iris={m['iris_diameter']:.0f}px pupil/iris={m['pupil_iris_ratio']:.2f} "
                      f"usable={m['usable_iris_area_percent']:.0f}% sharp={m['iso_sharpness']:.1f} "
                      f"sclera={m['iso_iris_sclera_contrast']:.1f} concentric={m['iso_iris_pupil_concentricity']:.0f} "
                      f"margin={m['iso_margin_adequacy']:.0f}")
            for c in a.codes:
                print(f"  {c}: {gettext(CODES[c])}")
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return status
