"""`python -m firmware.relay --config PATH`: run the record relay alone (tests, diagnosis)."""

import sys

from firmware.relay.relay import main

sys.exit(main())
