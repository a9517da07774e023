"""`rekam quality finger FILE... [--json]`: score fingerprint image files as the kit would.

Each file is read, converted to the sensor format unless it already is 256x288 or 192x192 (gray,
centre crop / white pad to 256x288 without resampling, 16 levels), and judged by `quality.assess`.
Thresholds and gate limits come from `[quality_finger]` of the config named by `--config` /
$REKAM_CONFIG / /etc/rekam/rekam.toml when one exists, else the shipped defaults. Each image gets
the verdict the kit would give: ACCEPT (score at or above the threshold, no hard reject), RETAKE
(below the threshold) or REJECT (a hard reject: the reason says what to fix).
Exit status, as `rekam quality face`: 0 every image accepted, 1 at least one retake or reject,
2 a file could not be read, 78 a bad config file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from firmware.capture import sensor_image
from firmware.system.i18n import N_, _, gettext

# Features shown in the text output (the JSON output has them all).
SHOWN = ("OCL_Bin10_Mean", "LCS_Bin10_Mean", "FDA_Bin10_Mean", "RVUP_Bin10_Mean", "OF_Bin10_Mean",
         "Mu", "MMB", "fg_fraction", "fg_cx", "fg_cy", "minutiae")


EX_ACCEPTED, EX_NOT_ACCEPTED, EX_UNREADABLE = 0, 1, 2
#: The verdict words of the text output (the --json document keeps the English codes).
VERDICTS = {"ACCEPT": N_("ACCEPT"), "RETAKE": N_("RETAKE"), "REJECT": N_("REJECT")}


def _section(args: argparse.Namespace) -> Any:
    """The `[quality_finger]` section in use (ConfigError for a bad file)."""
    from firmware import config

    path = getattr(args, "config", None) or os.environ.get("REKAM_CONFIG") or None
    if path is None and config.DEFAULT_PATH.exists():
        path = str(config.DEFAULT_PATH)
    return config.load(path).quality_finger if path else config.defaults().quality_finger


def verdict(q: Any, threshold: float) -> str:
    """ACCEPT, RETAKE or REJECT, as the kit's capture policy would judge this one impression."""
    if q.rejected:
        return "REJECT"
    return "ACCEPT" if q.score >= threshold else "RETAKE"


def run(args: argparse.Namespace) -> int:
    """Judge every file in ``args.files``; print text (or JSON with ``args.json``)."""
    from firmware import config
    from firmware.quality.finger import alloc, gates, quality

    try:
        section = _section(args)
    except config.ConfigError as e:
        return e.report()
    limits = gates.Limits.from_config(section.model_dump())
    threshold = float(section.threshold)
    alloc.tune()
    results: list[dict[str, object]] = []
    status = EX_ACCEPTED
    for path in args.files:
        try:
            img = sensor_image.load_file(path)
            converted = tuple(img.shape) not in sensor_image.SENSOR_SHAPES
            q = quality.assess(sensor_image.to_sensor(img), limits)
        except sensor_image.ImageFormatError as e:
            status = EX_UNREADABLE
            results.append({"file": path, "error": str(e)})
            if not args.json:
                print(_("{path}: error: {error}", path=path, error=e), file=sys.stderr)
            continue
        v = verdict(q, threshold)
        if v != "ACCEPT" and status == EX_ACCEPTED:
            status = EX_NOT_ACCEPTED
        entry = {"file": path, "converted_to_sensor_format": converted, **q.summary(), "verdict": v,
                 "threshold": threshold}
        results.append(entry)
        if not args.json:
            t = f"{threshold:.0f}"
            why = {"ACCEPT": _("at or above the threshold {threshold}", threshold=t),
                   "RETAKE": _("below the threshold {threshold}: the kit asks for a retake", threshold=t),
                   "REJECT": _("hard reject")}[v]
            print(_("{path}: {verdict} score {score} ({why}; {ms} ms{converted})", path=path,
                    verdict=gettext(VERDICTS[v]), score=format(q.score, ".0f"), why=why, ms=format(q.elapsed_ms, ".0f"),
                    converted=", " + _("converted to 256x288 16-level") if converted else ""))
            for code, msg in zip(q.codes, q.messages, strict=True):
                print(f"  {code}: {gettext(msg)}")  # translated where a catalog has it (else English)
            print("  " + " ".join(f"{k}={q.features[k]:.3g}" for k in SHOWN))
    if args.json:
        print(json.dumps(results if len(results) != 1 else results[0], indent=2))
    return status
