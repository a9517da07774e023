"""The checks behind the config models: value types with rekam's own error texts, and the key-file check.

Custom checks raise `PydanticCustomError` of two kinds that `firmware.config.loader` turns into the
problem lines of a `ConfigError`: ``rekam_must`` (``key = value: must be <allowed>``) and
``rekam_problem`` (``key[i] = value: <what is wrong>``, e.g. a missing key file).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator
from pydantic_core import PydanticCustomError

from firmware.system.fsutil import read_regular
from firmware.system.i18n import N_

#: A key or password file a config names is a few hundred bytes (a PEM key); far more is not one.
KEY_FILE_MAX = 64 * 1024

Check = Callable[[Any], "str | None"]

FINGER_CODES = [f"{h}{n}" for h in "RL" for n in range(1, 6)]
BAUD_RATES = [9600 * n for n in range(1, 13)]


def resolve_path(base_dir: Path, value: str) -> Path:
    """A path from the config: ``~`` expanded, relative ones against the config file's directory."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


# --- checks: each returns None when fine, else what is allowed ------------------------------------


def must(allowed: str) -> PydanticCustomError:
    """The error of a custom check; the loader prints it as ``key = value: must be <allowed>``."""
    return PydanticCustomError("rekam_must", "must be {allowed}", {"allowed": allowed})


def problem(msgid: str, **ctx: str) -> PydanticCustomError:
    """The error of one bad item; the loader prints it as ``key[i] = value: <msgid filled>``, translated."""
    return PydanticCustomError("rekam_problem", msgid, {**ctx, "msgid": msgid})


def checked(fn: Check) -> AfterValidator:
    """An after-validator running `fn` on the already type-checked value."""

    def run(v: Any) -> Any:
        if why := fn(v):
            raise must(why)
        return v

    return AfterValidator(run)


def checked_if(kind: type, fn: Check) -> BeforeValidator:
    """A before-validator running `fn` on the whole value when it is a `kind` (a list, a table).

    It runs before the item types are checked, so `fn` names the whole rule (e.g. distinct finger
    codes) rather than the first bad item; a value of another kind is left to the type check.
    """

    def run(v: Any) -> Any:
        if isinstance(v, kind) and (why := fn(v)):
            raise must(why)
        return v

    return BeforeValidator(run)


def nonempty(v: Any) -> str | None:
    return None if v else N_("not empty")


def ip_address(v: Any) -> str | None:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return N_("an IP address such as 127.0.0.1")
    return None


def one_of(*choices: Any) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else "one of " + ", ".join(repr(c) for c in choices)

    return check


def fingers(v: list[Any]) -> str | None:
    if not all(isinstance(f, str) and f in FINGER_CODES for f in v) or len(set(v)) != len(v):
        return "a list of distinct finger codes from " + ", ".join(FINGER_CODES)
    return None


def finger_thresholds(v: dict[Any, Any]) -> str | None:
    ok = all(isinstance(k, str) and k in FINGER_CODES and isinstance(t, (int, float)) and not isinstance(t, bool)
             and 0 <= t <= 100 for k, t in v.items())
    return None if ok else N_("a table of finger code (R1-R5, L1-L5) = number 0-100")


def valid_pin_hash(stored: Any) -> str | None:
    """Config check for a PIN hash: None if usable, else what is expected."""
    if not isinstance(stored, str) or stored.count("$") != 5 or not stored.startswith("scrypt$"):
        return N_("a PIN hash from `rekam operator hash-pin` (scrypt$...)")
    return None


def operators(v: list[Any]) -> str | None:
    seen = set()
    for i, e in enumerate(v):
        if not isinstance(e, dict):
            return f"a list of tables (item {i} is not)"
        oid = e.get("id")
        if not isinstance(oid, str) or not oid or not all(c.isalnum() or c in "._-" for c in oid) or len(oid) > 64:
            return f"tables whose id is 1-64 letters, digits, . _ - (item {i} has {oid!r})"
        if oid in seen:
            return f"tables with distinct ids ({oid!r} repeats)"
        seen.add(oid)
        if why := valid_pin_hash(e.get("pin_hash")):
            return f"tables with pin_hash = {why} (operator {oid!r})"
        if e.get("role", "operator") not in ("operator", "supervisor"):
            return f"tables whose role is 'operator' or 'supervisor' (operator {oid!r})"
        extra = set(e) - {"id", "name", "pin_hash", "role"}
        if extra:
            return f"tables with keys id, name, pin_hash, role (operator {oid!r} has {', '.join(sorted(extra))})"
    return None


def hostport(v: Any) -> str | None:
    host, sep, port = str(v).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return N_("host:port strings such as broker.example.org:8883")
    return None


def broker_url(v: Any) -> str | None:
    from firmware.wire.relay_protocol import parse_broker_url

    try:
        parse_broker_url(str(v))
    except ValueError:
        return N_("broker URLs such as mqtts://dc.example.org:8883 or mqtt://127.0.0.1:1883")
    return None


# The directory key files are read from while a document is validated (`checking_files_in`). A context
# variable, not pydantic's validation context: RekamConfig has its own __init__ (the positional
# compatibility form), and pydantic does not pass the context through a custom __init__.
_files_base: ContextVar[Path | None] = ContextVar("rekam_config_files_base", default=None)


@contextmanager
def checking_files_in(base_dir: Path) -> Iterator[None]:
    """Within this block, validation also loads the data-center key files, relative to `base_dir`."""
    token = _files_base.set(base_dir)
    try:
        yield
    finally:
        _files_base.reset(token)


def _key_file(v: str) -> str:
    """A data-center public key file must load (relative to the config file's directory).

    Checked only while validating a document (`firmware.config.validate`), not when a `RekamConfig`
    is rebuilt from values that were validated already.
    """
    base_dir = _files_base.get()
    if base_dir is None:
        return v
    from firmware.wire.record_format import load_recipient_key

    p = resolve_path(base_dir, v)
    try:
        load_recipient_key(read_regular(p, KEY_FILE_MAX))
    except FileNotFoundError:
        raise problem(N_("file not found ({path})"), path=str(p)) from None
    except (OSError, ValueError) as e:
        raise problem(N_("not an X25519 public key ({why})"), why=str(e)) from None
    return v


def _secret_file(v: str) -> str:
    """A password file, if set, must be a readable regular file of at most `KEY_FILE_MAX` bytes (relative to the
    config file's directory): a path at a FIFO or ``/dev/zero`` would hang or exhaust the daemon at start."""
    base_dir = _files_base.get()
    if base_dir is None or not v:
        return v
    p = resolve_path(base_dir, v)
    try:
        read_regular(p, KEY_FILE_MAX)
    except FileNotFoundError:
        raise problem(N_("file not found ({path})"), path=str(p)) from None
    except OSError as e:
        raise problem(N_("cannot be read ({why})"), why=str(e)) from None
    return v


def ack_public_keys(v: list[Any]) -> str | None:
    """Data-center ack keys: distinct base64 Ed25519 public keys (32 bytes each)."""
    from firmware.wire.relay_protocol import load_ack_public_key

    try:
        raws = [load_ack_public_key(k) for k in v]
    except (ValueError, TypeError):
        return N_("a list of base64 Ed25519 public keys (from `rekam-fleet archive ack-key`)")
    if len(set(raws)) != len(raws):
        return N_("a list of distinct keys")
    return None


# --- value types --------------------------------------------------------------------------------------

NonEmptyStr = Annotated[str, checked(nonempty)]
IpAddress = Annotated[str, checked(ip_address)]
HostPort = Annotated[str, checked(hostport)]
BrokerUrl = Annotated[str, checked(broker_url)]
KeyFile = Annotated[str, checked(nonempty), AfterValidator(_key_file)]
SecretFile = Annotated[str, AfterValidator(_secret_file)]
FingerList = Annotated[list[str], checked_if(list, fingers)]
FingerThresholds = Annotated[dict[str, float], checked_if(dict, finger_thresholds)]
OperatorList = Annotated[list[dict[str, Any]], checked_if(list, operators)]
AckKeyList = Annotated[list[str], checked_if(list, ack_public_keys)]
# Integer choices are not Literal: a Literal would also take False for 0 and 9600.0 for 9600.
Baud = Annotated[int, checked(one_of(*BAUD_RATES))]
TargetBaud = Annotated[int, checked(one_of(0, *BAUD_RATES))]


