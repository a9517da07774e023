"""`python -m firmware.cli`: the `rekam` command."""

import sys

from firmware.cli.main import main

sys.exit(main())
