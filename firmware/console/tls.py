"""The console's HTTPS certificate: self-signed, made on the kit, shown by its SHA-256 fingerprint.

Phones on the kit's Wi-Fi reach the console over HTTPS only. No public CA can vouch for a kit in
the field, so the kit makes its own certificate (ECDSA P-256, ten years) on first start and keeps
it in the identity folder (key mode 0600). The operator compares the fingerprint the phone's
browser shows with the one the kit shows on its own screen (console on loopback, QR code) before
signing in: a different fingerprint means someone in between.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from firmware.system.fsutil import atomic_write

CERT_NAME, KEY_NAME = "console-cert.pem", "console-key.pem"


@dataclass(frozen=True)
class ConsoleCert:
    """Where the certificate and key are, and the certificate's SHA-256 fingerprint."""

    cert_path: Path
    key_path: Path
    sha256: str  # 64 lowercase hex digits of SHA-256 over the DER certificate

    @property
    def fingerprint(self) -> str:
        """The fingerprint as browsers show it: upper-case hex pairs joined by colons."""
        return ":".join(self.sha256[i:i + 2] for i in range(0, 64, 2)).upper()


def fingerprint_of_pem(pem: bytes) -> str:
    """SHA-256 (hex) over the DER form of a PEM certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)).hexdigest()


def load_or_create(folder: Path, kit_id: str, addresses: list[str] | None = None) -> ConsoleCert:
    """The console certificate in `folder` (the identity folder), made on first use."""
    cert_path, key_path = folder / CERT_NAME, folder / KEY_NAME
    try:
        return ConsoleCert(cert_path, key_path, fingerprint_of_pem(cert_path.read_bytes()))
    except (FileNotFoundError, ValueError):
        pass  # none yet, or unreadable: make a new one (the fingerprint the kit shows changes with it)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname() or "rekam"
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys([host, f"{host}.local", "localhost"])]
    for a in ["127.0.0.1", *(addresses or [])]:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if not ip.is_unspecified:
            names.append(x509.IPAddress(ip))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"rekam console {kit_id}"[:64])])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = os.umask(0o077)
    try:
        atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        pem = cert.public_bytes(serialization.Encoding.PEM)
        atomic_write(cert_path, pem)
    finally:
        os.umask(old)
    return ConsoleCert(cert_path, key_path, fingerprint_of_pem(pem))


def qr_svg(cert: ConsoleCert, url: str = "") -> str:
    """An SVG QR code of the fingerprint (and the HTTPS address, when given) for a phone to scan."""
    import io

    import segno

    text = f"rekam-console sha256={cert.fingerprint}" + (f" url={url}" if url else "")
    buf = io.BytesIO()  # a standalone SVG document (with its namespace: served as an image, not inlined)
    segno.make(text, error="m").save(buf, kind="svg", scale=4, xmldecl=False, border=2)
    return buf.getvalue().decode()
