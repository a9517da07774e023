"""The fleet key certificate: the fleet CA's statement that an Ed25519 key is the fleet's signing key.

Without it the kit trusted the fleet key of the first approved claim (trust on first use), and so did the root
updater's pin, copied from a file the daemon writes: a daemon compromised between the claim and the pin could
have root pin a key of its own. With it, both check the key against the fleet CA certificate of the kit's image
(`control.ca_file`, root-owned, the CA the broker's TLS certificate chains to), whose private key never
comes near a kit.

Format (made by `provisioning.ca.certify_fleet_key`): one PEM X.509 certificate issued by the fleet CA, subject
CN `SUBJECT_CN`, the fleet's Ed25519 public key, BasicConstraints CA=false (critical), KeyUsage digitalSignature
only (critical) and a critical ExtendedKeyUsage holding `EKU_FLEET_KEY` alone. The fleet CA's other
certificates can never pass as one: a kit's comes from a CSR, which the CA signs only for an EC P-256 key, with
clientAuth; the broker's is EC with serverAuth.

Dates: a certificate is refused outside its validity by the kit's clock. The kit's clock is right enough by then:
the claim's TLS handshake, just before, checked the broker's certificate with the same clock.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from firmware.errors import ProtocolError
from firmware.wire.control_protocol import key_fingerprint, public_raw

#: rekam's private extended key usage "fleet signing key" (a UUID OID under 2.25, ITU-T X.667: no registry needed).
EKU_FLEET_KEY = x509.ObjectIdentifier("2.25.15570544685855571139511069452097005208")
SUBJECT_CN = "rekam fleet signing key"
MAX_CERT_BYTES = 16 * 1024  # one certificate, PEM: about 700 bytes
MAX_CA_BYTES = 256 * 1024  # the CA file may hold several CA certificates (a CA change-over)
REASON = "uncertified_fleet_key"


def _fail(message: str) -> ProtocolError:
    return ProtocolError(REASON, message)


def load_ca_certificates(ca_pem: bytes, where: str) -> list[x509.Certificate]:
    """The CA certificates of a PEM file (at least one); `ProtocolError` naming `where` otherwise."""
    if len(ca_pem) > MAX_CA_BYTES:
        raise _fail(f"{where}: {len(ca_pem)} bytes, more than {MAX_CA_BYTES}")
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as e:
        raise _fail(f"{where}: not a PEM certificate file ({e})") from None
    cas = [c for c in cas if _is_ca(c)]
    if not cas:
        raise _fail(f"{where}: holds no CA certificate")
    return cas


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def check(cert_pem: bytes, cas: list[x509.Certificate], fleet_key: Ed25519PublicKey,
          now: dt.datetime | None = None, where: str = "fleet key certificate") -> x509.Certificate:
    """The fleet key certificate `cert_pem` if it certifies `fleet_key` under one of `cas` (issued and signed by it,
    within its dates at `now`, the fleet-key usage, CA=false); `ProtocolError` (``uncertified_fleet_key``) naming
    what is wrong otherwise."""
    if len(cert_pem) > MAX_CERT_BYTES:
        raise _fail(f"{where}: {len(cert_pem)} bytes, more than {MAX_CERT_BYTES}")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise _fail(f"{where}: not a PEM certificate ({e})") from None
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise _fail(f"{where}: certifies a {type(key).__name__}, not an Ed25519 key")
    if public_raw(key) != public_raw(fleet_key):
        raise _fail(f"{where}: certifies key {key_fingerprint(key)}, not the fleet key offered "
                    f"{key_fingerprint(fleet_key)}")
    issuer = next((ca for ca in cas if _issued_by(cert, ca)), None)
    if issuer is None:
        raise _fail(f"{where}: not issued by the fleet CA of this kit (issuer {cert.issuer.rfc4514_string()})")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as e:
        raise _fail(f"{where}: lacks the {e.oid.dotted_string} extension") from None
    if not eku.critical or list(eku.value) != [EKU_FLEET_KEY]:
        raise _fail(f"{where}: its extended key usage is not the fleet signing key's ({EKU_FLEET_KEY.dotted_string}, "
                    "critical, alone)")
    if bc.ca:
        raise _fail(f"{where}: is a CA certificate")
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in cn] != [SUBJECT_CN]:
        raise _fail(f"{where}: subject {cert.subject.rfc4514_string()!r}, expected CN={SUBJECT_CN}")
    now = now or dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise _fail(f"{where}: valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}, "
                    f"the clock says {now:%Y-%m-%d %H:%M} UTC")
    return cert


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)  # issuer name and signature
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False
