"""`rekam quality finger FILE... [--json]`: score fingerprint image files as the kit would.

Each file is read, converted to the sensor format unless it already is 256x288 or 192x192 (gray,
centre crop / white pad to 256x288 without resampling, 16 levels), and judged by `quality.assess`.
Exit status: 0 all images judged (whatever their score), 1 some file could not be read.
"""

from __future__ import annotations

import argparse
import json
import sys

from firmware.capture import sensor_image

# Features shown in the text output (the JSON output has them all).
SHOWN = ("OCL_Bin10_Mean", "LCS_Bin10_Mean", "FDA_Bin10_Mean", "RVUP_Bin10_Mean", "OF_Bin10_Mean",
         "Mu", "MMB", "fg_fraction", "fg_cx", "fg_cy", "minutiae")


def run(args: argparse.Namespace) -> int:
    """Judge every file in ``args.files``; print text (or JSON with ``args.json``)."""
    from firmware.quality.finger import alloc, quality

    alloc.tune()
    results: list[dict[str, object]] = []
    status = 0
    for path in args.files:
        try:
            img = sensor_image.load_file(path)
            converted = tuple(img.shape) not in sensor_image.SENSOR_SHAPES
            q = quality.assess(sensor_image.to_sensor(img))
        except sensor_image.ImageFormatError as e:
            status = 1
            results.append({"file": path, "error": str(e)})
            if not args.json:
                print(f"{path}: error: {e}", file=sys.stderr)
            continue
        entry = {"file": path, "converted_to_sensor_format": converted, **q.summary()}
        results.append(entry)
        if not args.json:
            verdict = "REJECT" if q.rejected else "ok"
            print(f"{path}: score {q.score:.0f} ({verdict}; {q.elapsed_ms:.0f} ms"
                  f"{', converted to 256x288 16-level' if converted else ''})")
            for code, msg in zip(q.codes, q.messages, strict=True):
                print(f"  {code}: {msg}")
            print("  " + " ".join(f"{k}={q.features[k]:.3g}" for k in SHOWN))
    if args.json:
        print(json.dumps(results if len(results) != 1 else results[0], indent=2))
    return status
