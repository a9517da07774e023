"""docs/provisioning.md names every control topic, command, refusal reason and [control] key."""

from __future__ import annotations

from pathlib import Path

from firmware import config
from firmware.wire import control_protocol as cp

DOC = (Path(__file__).resolve().parents[2] / "docs" / "provisioning.md").read_text()


def test_every_topic_command_and_key_is_documented() -> None:
    kit = "rk-x"
    topics = [cp.config_topic(kit), cp.config_state_topic(kit), cp.cmd_topic(kit), cp.result_topic(kit),
              cp.telemetry_topic(kit), cp.status_topic(kit)]
    missing = [t for t in topics if f"`<kit>/{t.split('/', 3)[3]}`" not in DOC]
    missing += [c for c in cp.COMMANDS if f"`{c}`" not in DOC]
    missing += [k for k in config.SCHEMA["control"] if f"`{k}`" not in DOC]
    missing += [r for r in ("too_large", "not_json", "malformed", "wrong_kind", "bad_version", "bad_signature",
                            "unknown_command", "expired", "future", "ttl_too_long", "too_old") if f"`{r}`" not in DOC]
    assert not missing, f"not in docs/provisioning.md: {missing}"
