"""Run every benchmark in this folder: `make bench` (or `python -m bench [NAME...]`)."""

import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
names = sys.argv[1:] or sorted(p.stem for p in here.glob("bench_*.py"))
rc = 0
for name in names:
    script = here / (name if name.endswith(".py") else name + ".py")
    print(f"=== {script.stem}", flush=True)
    rc |= subprocess.call([sys.executable, str(script)])
sys.exit(rc)
