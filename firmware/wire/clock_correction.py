"""The clock correction: a signed note that records a kit sealed before its clock was synchronised were off by
`offset_s` (issue #18; made by `firmware.system.clock.ClockCorrections`, carried in telemetry).

``{"type": "rekam.clock-correction/1", "kit_id", "boot_id", "source", "issued", "segments": [{"first_seq",
"last_seq", "first_record", "last_record", "records", "offset_s"}], "sig"}``: `sig` is the kit key's Ed25519
signature over the canonical JSON of everything else (the control protocol's canonical form). The data center
adds `offset_s` to `created` of the records of `kit_id` with ``first_seq <= seq <= last_seq`` whose header says
``clock_synced: false`` (`offset_s` null: the kit rebooted before it synced; order them by seq only).

Plausible times (`implausible_time`): a corrected time, and a synchronised wall clock, lie in
[`NOT_BEFORE`, `NOT_AFTER`]. The kit signs no correction moving a record out of it and the data center keeps
none that does. The offset itself is not bounded this way: a Pi without RTC may boot at 1970, so an offset of
56 years is legitimate; it is where the records land that can be checked.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# The plausible range of a record's time lives with the clock (the foundation, which the wire formats may import).
from firmware.system.clock import NOT_AFTER, NOT_BEFORE, implausible_time, when  # noqa: F401 (re-exported)
from firmware.wire.control_protocol import canonical

TYPE = "rekam.clock-correction/1"

def sign(body: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed correction for `body` (its `type` is set here)."""
    signed = {**body, "type": TYPE}
    return {**signed, "sig": base64.b64encode(key.sign(canonical(signed))).decode()}


def verify(doc: Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    """True when `doc` is a clock correction signed by `public_key` (the kit key of the records' headers)."""
    body = {k: v for k, v in doc.items() if k != "sig"}
    try:
        public_key.verify(base64.b64decode(str(doc["sig"]), validate=True), canonical(body))
    except (InvalidSignature, KeyError, ValueError, TypeError):
        return False
    return body.get("type") == TYPE
