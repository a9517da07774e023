"""The signed envelope and message shapes (firmware/wire/control_protocol.py), property-tested (bounded)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.wire import control_protocol as cp

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
bodies = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@settings(max_examples=150, deadline=None)
@given(body=bodies, kind=st.sampled_from(cp.KINDS))
def test_sign_verify_round_trip(body, kind) -> None:
    assert cp.verify(cp.sign(kind, body, KEY), kind, PUB) == body


@settings(max_examples=150, deadline=None)
@given(body=bodies, pos=st.integers(min_value=0), bit=st.integers(0, 7))
def test_any_bit_flip_is_refused_or_changes_nothing(body, pos, bit) -> None:
    data = bytearray(cp.sign("config", body, KEY))
    data[pos % len(data)] ^= 1 << bit
    try:
        got = cp.verify(bytes(data), "config", PUB)
    except cp.ProtocolError:
        return
    # Only a flip in the unused low bits of the base64 signature's last character can survive: it decodes
    # to the same signature, so the signed content is unchanged.
    assert got == body


def test_kind_is_signed() -> None:
    data = cp.sign("cmd", {"x": 1}, KEY)
    forged = data.replace(b'"kind":"cmd"', b'"kind":"config"')
    with pytest.raises(cp.ProtocolError) as e:
        cp.verify(forged, "config", PUB)
    assert e.value.reason == "bad_signature"


@pytest.mark.parametrize("topic", ["rekam/v1/rk-abc/config", "rekam/v1/rk-abc/config/applied"])
def test_parse_kit_topic(topic) -> None:
    assert cp.parse_kit_topic(topic)[0] == "rk-abc"


@pytest.mark.parametrize("topic", ["rekam/v1/+/config", "rekam/v1/#", "rekam/v2/rk-abc/config", "rekam/v1/RK-ABC/x",
                                   "rekam/v1/claim/claim-a/rk-abc/request/x", "rekam/v1/rk-a b/config"])
def test_parse_kit_topic_refuses(topic) -> None:
    assert cp.parse_kit_topic(topic) is None


def test_claim_topic_parse() -> None:
    assert cp.parse_claim_topic(cp.claim_request_topic("claim-b1", "rk-abc")) == ("claim-b1", "rk-abc")
    assert cp.parse_claim_topic("rekam/v1/claim/fleet/rk-abc/request") is None  # not a claim user
    assert cp.parse_claim_topic("rekam/v1/claim/claim-b1/rk-abc/response") is None


@pytest.mark.parametrize("field,value,reason", [
    ("issued_at", True, "malformed"), ("cmd_id", "x", "malformed"), ("name", "rm_rf", "unknown_command"),
    ("kit_id", "rk-abc/cmd", "malformed"), ("args", None, "malformed"), ("expires_at", 0, "malformed")])
def test_command_shape(field, value, reason) -> None:
    body = {"cmd_id": "abcdefgh", "kit_id": "rk-abc", "name": "status", "args": {}, "issued_at": 10,
            "expires_at": 20}
    cp.check_command(body)
    with pytest.raises(cp.ProtocolError) as e:
        cp.check_command({**body, field: value})
    assert e.value.reason == reason


def test_oversized_message_cannot_be_signed() -> None:
    with pytest.raises(ValueError, match="limit"):
        cp.sign("telemetry", {"pad": "x" * cp.MAX_PAYLOAD}, KEY)
