"""Claiming: how a new kit joins the fleet with nothing secret in its image but a batch claim certificate.

1. The kit makes its own TLS key (EC P-256, never leaves ``<state_dir>/control/``) and a CSR whose
   CN is its kit id.
2. It connects to a *claim listener* with the claim certificate (client id = kit id), subscribes to
   its claim response topic, then publishes a claim request signed with its Ed25519 kit key:
   kit id, kit public key, hardware serial, software version, CSR, a fresh nonce.
3. The fleet approves it (allow-list or `rekam-fleet kits approve`) and answers, signed with the
   fleet key: the kit's certificate (signed by the fleet CA for that CSR), the CA certificate, the
   fleet public key and the first signed config document. Until then it answers ``pending``.
4. The kit checks the answer (same nonce, certificate for its own key and id, signature by the
   fleet key it carries, that key certified by the fleet CA of the image, `control.ca_file`:
   `firmware.wire.fleet_key_cert`; the same as `control.fleet_public_key` when that presets it, or as
   the key of an earlier claim), stores everything atomically and from then on connects with its
   own certificate. The root updater pins the key only with its certificate (`rekam update
   pin-fleet-key`).

A claim attempt that gets no answer or ``pending`` is retried with capped, jittered backoff
forever; the fleet drops pending claims after some hours, and the next retry renews it.
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from firmware import __version__
from firmware.config import Config
from firmware.errors import ClaimError
from firmware.seal.identity import KitIdentity
from firmware.system.backoff import Backoff
from firmware.system.fsutil import atomic_write, fsync_dir, read_regular
from firmware.system.mqtt import Broker, MqttLink, MqttSettings
from firmware.wire import control_protocol as cp
from firmware.wire import fleet_key_cert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlPaths:
    """The kit's control-plane files under ``<state_dir>/control/``."""

    root: Path

    @classmethod
    def of(cls, cfg: Config) -> ControlPaths:
        return cls(cfg.state_dir / "control")

    @property
    def tls_key(self) -> Path:
        return self.root / "tls.key"

    @property
    def csr(self) -> Path:
        return self.root / "tls.csr"

    @property
    def cert(self) -> Path:
        return self.root / "kit.crt"

    @property
    def ca(self) -> Path:
        return self.root / "fleet-ca.crt"

    @property
    def fleet_key(self) -> Path:
        return self.root / "fleet.pub"

    @property
    def fleet_key_cert(self) -> Path:
        return self.root / "fleet-key.crt"

    @property
    def claim_state(self) -> Path:
        return self.root / "claim.json"

    def provisioned(self) -> bool:
        """True once a claim completed (own certificate and pinned fleet key present)."""
        return self.cert.exists() and self.tls_key.exists() and self.fleet_key.exists()

    def pinned_fleet_key(self) -> Any:
        """The pinned fleet Ed25519 public key, or None before the claim."""
        try:
            return cp.load_public_b64(self.fleet_key.read_text())
        except FileNotFoundError:
            return None


def hardware_serial(cfg: Config) -> str:
    """The board serial (Raspberry Pi device tree), or ``unknown`` off a Pi."""
    try:
        raw = read_regular(Path(cfg.kit.hardware_serial_file), 4096)
        return raw.rstrip(b"\x00\n ").decode("ascii", "replace")[:64] or "unknown"
    except OSError:
        return "unknown"


def ensure_tls_key(paths: ControlPaths, kit_id: str) -> bytes:
    """Create the kit's TLS key and CSR once; returns the CSR (PEM)."""
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if paths.tls_key.exists() and paths.csr.exists():
        return paths.csr.read_bytes()
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(paths.tls_key, pem)
    paths.tls_key.chmod(0o600)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, kit_id)]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    atomic_write(paths.csr, csr)
    return csr


def claim_user(cfg: Config) -> str:
    """The claim certificate's CN (``claim-<batch>``): the broker's user name for it."""
    p = cfg.path(cfg.control.claim_cert_file)
    try:
        cert = x509.load_pem_x509_certificate(p.read_bytes())
    except (OSError, ValueError) as e:
        raise ClaimError("no_claim_cert", f"cannot read claim certificate {p}: {e}") from None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn or not cp.CLAIM_USER_RE.fullmatch(str(cn[0].value)):
        raise ClaimError("no_claim_cert", f"{p}: CN must be claim-<batch>")
    return str(cn[0].value)


def build_request(cfg: Config, identity: KitIdentity, csr: bytes, nonce: str) -> bytes:
    """The signed claim request payload."""
    body = {"kit_id": identity.kit_id, "public_key": identity.public_key_b64, "hardware_serial": hardware_serial(cfg),
            "software_version": __version__, "csr": csr.decode(), "nonce": nonce, "issued_at": int(time.time())}
    return cp.sign("claim", body, identity.signing_key)


def check_response(data: bytes, cfg: Config, identity: KitIdentity, paths: ControlPaths, nonce: str) -> dict[str, Any]:
    """Verify a claim response; returns its body. Raises `ClaimError` naming what is wrong."""
    try:
        body, _, _ = cp.decode(data, "claim_response")
        cp.check_claim_response(body)
    except cp.ProtocolError as e:
        raise ClaimError("bad_response", str(e)) from None
    # Parsed before anything uses it (fingerprint, comparison): the body is not verified yet, and a key that is
    # not base64 would otherwise raise binascii.Error out of the claim loop and end the control thread.
    try:
        fleet_key = cp.load_public_b64(body["fleet_public_key"])
    except cp.ProtocolError as e:
        raise ClaimError("bad_response", f"claim_response.fleet_public_key: {e}") from None
    pinned = _pinned_key(cfg, paths)
    if pinned is not None and cp.public_raw(pinned) != cp.public_raw(fleet_key):
        raise ClaimError("wrong_fleet_key", f"response key {cp.key_fingerprint(fleet_key)} is not "
                         f"the pinned fleet key {cp.key_fingerprint(pinned)}")
    try:
        body = cp.verify(data, "claim_response", fleet_key)
    except cp.ProtocolError as e:
        raise ClaimError("bad_response", str(e)) from None
    if body["kit_id"] != identity.kit_id or body["nonce"] != nonce:
        raise ClaimError("bad_response", "response is for another kit or another attempt (kit id/nonce)")
    if body["status"] != "approved":
        return body
    try:
        cert = x509.load_pem_x509_certificate(body["certificate"].encode())
        x509.load_pem_x509_certificate(body["ca_certificate"].encode())
    except ValueError as e:
        raise ClaimError("bad_response", f"certificate does not parse: {e}") from None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    key = serialization.load_pem_private_key(paths.tls_key.read_bytes(), password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    same_key = cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    if not cn or cn[0].value != identity.kit_id or not same_key:
        raise ClaimError("bad_response", "certificate is not for this kit's id and TLS key")
    # The fleet key signed this answer; the image's CA (not the answer's ca_certificate) says whose key that is.
    ca_file = cfg.path(cfg.control.ca_file)
    try:
        cas = fleet_key_cert.load_ca_certificates(read_regular(ca_file, fleet_key_cert.MAX_CA_BYTES), str(ca_file))
        fleet_key_cert.check(body["fleet_key_certificate"].encode(), cas, fleet_key,
                             where="claim_response.fleet_key_certificate")
    except OSError as e:
        raise ClaimError("no_ca", f"cannot read the fleet CA {ca_file}: {e}") from None
    except cp.ProtocolError as e:
        raise ClaimError(e.reason, str(e)) from None
    return body


def _pinned_key(cfg: Config, paths: ControlPaths) -> Any:
    """The fleet key the response must carry (`control.fleet_public_key`, else one pinned by an earlier claim), or
    None (trust on first claim). `ClaimError` naming where it came from when that key itself is not a key."""
    preset, where = cfg.control.fleet_public_key, "control.fleet_public_key"
    if not preset and paths.fleet_key.exists():
        preset, where = paths.fleet_key.read_text(), str(paths.fleet_key)
    if not preset.strip():
        return None
    try:
        return cp.load_public_b64(preset)
    except cp.ProtocolError as e:
        raise ClaimError("bad_fleet_key", f"{where}: {e}") from None


def store_credentials(paths: ControlPaths, body: dict[str, Any]) -> None:
    """Write the certificate, CA, the fleet key's certificate and the pinned fleet key (fleet key last: it marks the
    claim complete and starts the root pin, which reads the certificate)."""
    atomic_write(paths.cert, body["certificate"].encode())
    atomic_write(paths.ca, body["ca_certificate"].encode())
    atomic_write(paths.fleet_key_cert, body["fleet_key_certificate"].encode())
    atomic_write(paths.claim_state, json.dumps({"claimed_at": int(time.time()),
                                                "fleet_key": cp.key_fingerprint(body["fleet_public_key"])}).encode())
    atomic_write(paths.fleet_key, body["fleet_public_key"].encode())
    fsync_dir(paths.root)


def tls_context(ca_file: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Client TLS: verify the broker against the fleet CA, present our certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def attempt(cfg: Config, identity: KitIdentity, broker: str, wait_s: float) -> dict[str, Any]:
    """One claim attempt against one claim listener; returns the verified response body."""
    paths = ControlPaths.of(cfg)
    csr = ensure_tls_key(paths, identity.kit_id)
    user = claim_user(cfg)
    nonce = secrets.token_hex(16)
    deadline = time.monotonic() + wait_s
    settings = MqttSettings(
        [Broker.parse(broker, tls=True)], identity.kit_id, keepalive_s=30, connect_timeout_s=wait_s,
        probe_interval_s=0,
        tls_context=lambda: tls_context(cfg.path(cfg.control.ca_file), cfg.path(cfg.control.claim_cert_file),
                                        cfg.path(cfg.control.claim_key_file)),
        subscriptions=[(cp.claim_response_topic(user, identity.kit_id), 1)], name="claim")
    link = MqttLink(settings)
    link.should_stop = lambda: time.monotonic() > deadline  # one attempt: no reconnect rounds past its time
    if not link.connect(0):
        raise ClaimError("connect", link.last_error or f"{broker}: cannot connect")
    try:
        while not link.ready.is_set():
            if time.monotonic() > deadline:
                raise ClaimError("timeout", f"{broker}: no SUBACK within {wait_s:.0f} s")
            link.step(0.05)
        if link.send(cp.claim_request_topic(user, identity.kit_id), build_request(cfg, identity, csr, nonce),
                     qos=1) is None:
            raise ClaimError("connect", f"{broker}: connection lost before the claim request")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            link.step(0.05)
            while link.events:
                ev = link.events.popleft()
                if ev.kind != "message":
                    continue
                try:
                    return check_response(ev.payload, cfg, identity, paths, nonce)
                except ClaimError as e:
                    # A stale retained answer or junk: log it and keep waiting for ours.
                    log.warning("claim response refused reason=%s detail=%s", e.reason, e)
        raise ClaimError("timeout", f"{broker}: no answer from the fleet within {wait_s:.0f} s")
    finally:
        link.close()


def claim(cfg: Config, identity: KitIdentity, stop: threading.Event | None = None,
          max_attempts: int | None = None) -> bytes | None:
    """Claim until approved (or `stop`/`max_attempts`); stores the credentials and returns the first signed
    config document (bytes) the fleet sent, or None if it gave up. Backoff (`firmware.system.backoff`):
    claim_retry_min_s doubling to claim_retry_max_s, equal jitter."""
    c = cfg.control
    brokers = list(c.claim_brokers)
    if not brokers:
        raise ClaimError("no_brokers", "control.claim_brokers is empty")
    paths = ControlPaths.of(cfg)
    backoff = Backoff(min(c.claim_retry_min_s, c.claim_retry_max_s), c.claim_retry_max_s)
    n = 0
    stop = stop or threading.Event()
    while not stop.is_set():
        broker = brokers[n % len(brokers)]
        n += 1
        try:
            body = attempt(cfg, identity, broker, c.claim_wait_s)
            if body["status"] == "approved":
                store_credentials(paths, body)
                log.info("claimed kit_id=%s broker=%s fleet_key=%s", identity.kit_id, broker,
                         cp.key_fingerprint(body["fleet_public_key"]))
                return body["config"].encode()
            delay = backoff.next()
            log.info("claim %s kit_id=%s reason=%s; retrying in %.0f s", body["status"], identity.kit_id,
                     body.get("reason", ""), delay)
        except ClaimError as e:
            delay = backoff.next()
            log.warning("claim attempt failed kit_id=%s broker=%s reason=%s detail=%s; retrying in %.0f s",
                        identity.kit_id, broker, e.reason, e, delay)
        if max_attempts is not None and n >= max_attempts:
            return None
        stop.wait(delay)
    return None
