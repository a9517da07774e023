"""`python -m firmware.config [PATH] [--markdown]`: validate a config or print the key reference."""

import sys

from firmware.config import main

sys.exit(main())
