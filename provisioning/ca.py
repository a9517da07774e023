"""The fleet's PKI and the broker's security configuration.

Two certificate authorities, so a claim certificate is useless anywhere but the claim listener:

* the **fleet CA** signs the broker's server certificate, the fleet/ingest client certificate
  (CN ``fleet``) and each kit's client certificate (CN = kit id, from a CSR made on the kit; the
  kit's private key never leaves it). The main listener trusts only this CA, checks its CRL,
  and takes the certificate CN as the MQTT user name (`use_identity_as_username`), which the
  ACL patterns bind to topics (``rekam/v1/%u/...``).
* the **claim CA** signs batch claim certificates (CN ``claim-<batch>``) that go into the kit
  image. Only the claim listener trusts it, and its ACL allows nothing but the claim topics.

The fleet CA also certifies the fleet's Ed25519 signing key (``fleet-key.crt``, `certify_fleet_key`, format in
`firmware.wire.fleet_key_cert`): the claim answer carries it, and the kit and its root updater check the fleet key
against the CA certificate of the kit's image instead of trusting the first key they see.

Layout of ``<data>/ca``: ``fleet-ca.{key,crt}``, ``claim-ca.{key,crt}``, ``server.{key,crt}``,
``fleet-client.{key,crt}``, ``fleet-key.crt``, ``claim-<batch>.{key,crt}``, ``crl.pem``, ``issued.json``.
Private keys are written mode 0600, atomically, into a new file (`_write_private`): never through a symlink, never
keeping the mode of a file that was there.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firmware.errors import CaError
from firmware.system.fsutil import fsync_dir, write_all
from firmware.system.i18n import N_
from firmware.wire import fleet_key_cert
from firmware.wire.ids import is_kit_id
from provisioning.texts import Reason

TEMPLATES = Path(__file__).resolve().parent / "mosquitto"
BATCH_RE = re.compile(r"^[A-Za-z0-9._-]{1,42}$")


@dataclass(frozen=True)
class CaPaths:
    """Where the CA's files are."""

    root: Path

    def __getattr__(self, name: str) -> Path:
        files = {"fleet_ca_key": "fleet-ca.key", "fleet_ca_crt": "fleet-ca.crt", "claim_ca_key": "claim-ca.key",
                 "claim_ca_crt": "claim-ca.crt", "server_key": "server.key", "server_crt": "server.crt",
                 "fleet_key": "fleet-client.key", "fleet_crt": "fleet-client.crt", "crl": "crl.pem",
                 "fleet_key_crt": "fleet-key.crt",
                 "issued": "issued.json"}
        if name in files:
            return self.root / files[name]
        raise AttributeError(name)

    def claim_key(self, batch: str) -> Path:
        return self.root / f"claim-{batch}.key"

    def claim_crt(self, batch: str) -> Path:
        return self.root / f"claim-{batch}.crt"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write `path` atomically with exactly `mode`: a new temp file beside it (``O_EXCL|O_NOFOLLOW``), fchmod'ed
    (the umask never widens nor narrows it), fsync'd, renamed over `path`, directory fsync'd.

    Why not ``os.open(path, O_CREAT|O_TRUNC, 0o600)``: that keeps the mode of a file already there (a key re-issued
    over a 0644 file stayed 0644) and writes through a symlink planted at `path`. ``os.replace`` replaces a
    symlink instead of following it. (`firmware.system.fsutil.atomic_write` creates its temp file 0640: a key would
    be group-readable until a chmod after the rename.)"""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_file(path, pem, 0o600)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError(f"{path} is not an EC private key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CaError(f"cannot read certificate {path}: {e}") from e


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rekam fleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _self_signed(cn: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, public_key: object, days: int,
           server_hosts: list[str] | None = None) -> x509.Certificate:
    now = _now()
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
         .public_key(public_key).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server_hosts:
        sans: list[x509.GeneralName] = []
        for h in server_hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _record_issued(paths: CaPaths, cert: x509.Certificate, kind: str) -> None:
    issued = json.loads(paths.issued.read_text()) if paths.issued.exists() else []
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    issued.append({"serial": format(cert.serial_number, "x"), "cn": cn, "kind": kind,
                   "not_after": cert.not_valid_after_utc.isoformat(), "revoked_at": None})
    _write_file(paths.issued, json.dumps(issued, indent=1).encode(), 0o644)  # a torn issued.json: no CRL any more


def init_ca(root: Path, server_hosts: list[str], batch: str = "batch1", days: int = 3650) -> CaPaths:
    """Create both CAs, the broker's server certificate, the fleet client certificate, one claim
    certificate for `batch` and an empty CRL. Refuses to overwrite an existing CA."""
    if not BATCH_RE.fullmatch(batch):
        raise CaError(f"batch name {batch!r}: use 1-42 letters, digits, . _ -")
    paths = CaPaths(root)
    if paths.fleet_ca_key.exists():
        raise CaError(Reason(N_("a CA already exists in {path}; refusing to replace it (every kit certificate depends "
                                "on it)"), path=root))
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key, ca_cert = _self_signed("rekam fleet CA", days)
    _write_key(paths.fleet_ca_key, ca_key)
    paths.fleet_ca_crt.write_bytes(_pem(ca_cert))
    ck, cc = _self_signed("rekam claim CA", days)
    _write_key(paths.claim_ca_key, ck)
    paths.claim_ca_crt.write_bytes(_pem(cc))
    for cn, key_path, crt_path, hosts in (("broker", paths.server_key, paths.server_crt, server_hosts),
                                          ("fleet", paths.fleet_key, paths.fleet_crt, None)):
        k = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(ca_key, ca_cert, cn, k.public_key(), days, hosts)
        _write_key(key_path, k)
        crt_path.write_bytes(_pem(cert))
        _record_issued(paths, cert, "server" if hosts else "fleet")
    issue_claim_cert(paths, batch, days)
    write_crl(paths)
    return paths


def certify_fleet_key(paths: CaPaths, fleet_key: Ed25519PublicKey) -> bytes:
    """The fleet CA's certificate for the fleet's Ed25519 signing key (`firmware.wire.fleet_key_cert`), valid as
    long as the CA, written to ``fleet-key.crt``; returns its PEM. Made again (same key, new serial) if called
    again: the old one stays as good, it certifies the same key."""
    ca_key, ca_cert = _load_key(paths.fleet_ca_key), _load_cert(paths.fleet_ca_crt)
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(_name(fleet_key_cert.SUBJECT_CN)).issuer_name(ca_cert.subject)
            .public_key(fleet_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(ca_cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([fleet_key_cert.EKU_FLEET_KEY]), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = _pem(cert)
    _write_file(paths.fleet_key_crt, pem, 0o644)
    _record_issued(paths, cert, "fleet-key")
    return pem


def issue_claim_cert(paths: CaPaths, batch: str, days: int = 365) -> tuple[Path, Path]:
    """A claim certificate (CN ``claim-<batch>``) signed by the claim CA; goes into a kit image."""
    if not BATCH_RE.fullmatch(batch):
        raise CaError(f"batch name {batch!r}: use 1-42 letters, digits, . _ -")
    ck, cc = _load_key(paths.claim_ca_key), _load_cert(paths.claim_ca_crt)
    k = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(ck, cc, f"claim-{batch}", k.public_key(), days)
    _write_key(paths.claim_key(batch), k)
    paths.claim_crt(batch).write_bytes(_pem(cert))
    _record_issued(paths, cert, "claim")
    return paths.claim_crt(batch), paths.claim_key(batch)


def key_id(public_key: object) -> str:
    """SHA-256 (hex) of a public key's SubjectPublicKeyInfo: which key a CSR or a certificate is for."""
    der = public_key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def check_csr(csr_pem: bytes | str, expected_cn: str) -> x509.CertificateSigningRequest:
    """A kit's CSR, checked as `sign_csr` needs it (signature verifies, CN = `expected_cn`, an EC key); `CaError`
    otherwise."""
    if not is_kit_id(expected_cn):
        raise CaError(f"{expected_cn!r} is not a kit id")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
    except ValueError as e:
        raise CaError(f"not a PEM certificate request: {e}") from None
    if not csr.is_signature_valid:
        raise CaError("CSR signature does not verify")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != expected_cn:
        raise CaError(f"CSR common name is {[c.value for c in cns]}, expected {expected_cn!r}")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise CaError("CSR key must be an EC key (P-256)")
    return csr


def csr_key_id(csr_pem: bytes | str, expected_cn: str) -> str:
    """`key_id` of a checked CSR's key (`check_csr`; `CaError` if it is not one `sign_csr` would sign)."""
    return key_id(check_csr(csr_pem, expected_cn).public_key())


def cert_not_after(cert_pem: bytes | str) -> int:
    """A certificate's not-after time (Unix seconds)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode() if isinstance(cert_pem, str) else cert_pem)
    return int(cert.not_valid_after_utc.timestamp())


def sign_csr(paths: CaPaths, csr_pem: bytes | str, expected_cn: str, days: int = 825) -> tuple[bytes, str]:
    """Sign a kit's CSR: its signature must verify and its CN must be `expected_cn` (the kit id).

    Returns (certificate PEM, serial as hex).
    """
    pub = check_csr(csr_pem, expected_cn).public_key()
    cert = _issue(_load_key(paths.fleet_ca_key), _load_cert(paths.fleet_ca_crt), expected_cn, pub, days)
    _record_issued(paths, cert, "kit")
    return _pem(cert), format(cert.serial_number, "x")


def make_csr(kit_id: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR for `kit_id` (used by `kits issue` for a kit made on the bench)."""
    return (x509.CertificateSigningRequestBuilder().subject_name(_name(kit_id))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def issue_kit_files(paths: CaPaths, kit_id: str, out: Path, days: int = 825) -> tuple[Path, Path, str]:
    """Bench provisioning without a claim: make a key and certificate for `kit_id` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    k = ec.generate_private_key(ec.SECP256R1())
    pem, serial = sign_csr(paths, make_csr(kit_id, k), kit_id, days)
    _write_key(out / "tls.key", k)
    _write_file(out / "kit.crt", pem, 0o644)
    return out / "kit.crt", out / "tls.key", serial


def revoke(paths: CaPaths, serial_hex: str) -> bool:
    """Mark a certificate revoked and rewrite the CRL; False if the serial is unknown."""
    issued = json.loads(paths.issued.read_text()) if paths.issued.exists() else []
    found = False
    for e in issued:
        if e["serial"] == serial_hex.lower() and not e["revoked_at"]:
            e["revoked_at"] = _now().isoformat()
            found = True
    if found:
        _write_file(paths.issued, json.dumps(issued, indent=1).encode(), 0o644)
        write_crl(paths)
    return found


def write_crl(paths: CaPaths, days: int = 30) -> Path:
    """(Re)write ``crl.pem`` for the fleet CA listing every revoked certificate.

    The broker reads it at start and on SIGHUP; re-run (or `rekam-fleet ca crl`) before `days` pass.
    """
    issued = json.loads(paths.issued.read_text()) if paths.issued.exists() else []
    ca_key, ca_cert = _load_key(paths.fleet_ca_key), _load_cert(paths.fleet_ca_crt)
    now = _now()
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
         .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=days)))
    for e in issued:
        if e["revoked_at"] and e["kind"] == "kit":
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(e["serial"], 16))
                .revocation_date(dt.datetime.fromisoformat(e["revoked_at"])).build())
    crl = b.sign(ca_key, hashes.SHA256())
    _write_file(paths.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)  # the broker's user reads it
    return paths.crl


def ingest_group(group: str | None, key_file: str | Path | None) -> str:
    """The ingest's shared-subscription group: `group` if the operator named one, else ``ingest-`` and 128 bits of
    an HMAC keyed with the ingest's TLS private key (``ingest`` without a key file: a plain test broker).

    Why a secret: mosquitto 2.0's ACL file does not check subscriptions, so any kit may subscribe to
    ``$share/<group>/rekam/v1/+/records/+``; a kit in the ingest's group would be handed its share of every
    kit's records and the broker would drop them on its read ACL. A kit cannot join a group it cannot name;
    every worker started with the same key (one host or several) lands in the same group."""
    if group:
        return group
    if not key_file:
        return "ingest"
    return _secret_group("ingest", key_file, b"rekam ingest share group v1")


def fleet_service_group(paths: CaPaths) -> str:
    """The fleet services' shared-subscription group (`firmware.wire.control_protocol.fleet_service_filters`):
    ``fleet-`` and 128 bits of an HMAC keyed with the fleet client key (``ca/fleet-client.key``), so every
    `rekam-fleet serve` of one fleet folder lands in the same group and no kit can name it (why a secret: see
    `ingest_group`; a kit in the group would black-hole its share of claims, results and telemetry)."""
    return _secret_group("fleet", paths.fleet_key, b"rekam fleet service share group v1")


def _secret_group(prefix: str, key_file: str | Path, label: bytes) -> str:
    try:
        key = Path(key_file).read_bytes()
    except OSError as e:
        raise CaError(f"cannot read the {prefix} key {key_file}: {e}") from None
    return f"{prefix}-" + hmac.new(key, label, hashlib.sha256).hexdigest()[:32]


def render_broker_config(paths: CaPaths, out: Path, *, port: int = 8883, claim_port: int = 8884,
                         bind: str = "0.0.0.0", user: str = "mosquitto", extra: str = "",
                         persistence_dir: str | Path = "/var/lib/mosquitto/", server_crt: Path | None = None,
                         server_key: Path | None = None) -> Path:
    """Write ``mosquitto.conf``, ``acl`` and ``claim-acl`` for this CA into `out` from the templates in
    ``provisioning/mosquitto/``; returns the path of mosquitto.conf. `persistence_dir` (retained messages) must be
    writable by `user` (Debian's package makes /var/lib/mosquitto for it). `server_crt`/`server_key`: another server
    certificate of this CA (a shard broker's, `render_shard_broker`) instead of ``server.crt``."""
    out.mkdir(parents=True, exist_ok=True)
    pdir = str(persistence_dir).rstrip("/") + "/"  # mosquitto appends the file name to it as it is
    values = {"port": str(port), "claim_port": str(claim_port), "bind": bind, "user": user, "persistence_dir": pdir,
              "fleet_ca": str(paths.fleet_ca_crt), "claim_ca": str(paths.claim_ca_crt),
              "server_crt": str(server_crt or paths.server_crt), "server_key": str(server_key or paths.server_key),
              "crl": str(paths.crl),
              "acl": str(out / "acl"), "claim_acl": str(out / "claim-acl"), "extra": extra}
    conf = (TEMPLATES / "mosquitto.conf.template").read_text()
    for k, v in values.items():
        conf = conf.replace("{{" + k + "}}", v)
    (out / "mosquitto.conf").write_text(conf)
    for name in ("acl", "claim-acl"):
        (out / name).write_text((TEMPLATES / name).read_text())
    return out / "mosquitto.conf"


def render_shard_broker(paths: CaPaths, out: Path, name: str, hosts: list[str], *, port: int = 8883,
                        claim_port: int = 8884, days: int = 3650, **kw: object) -> Path:
    """A broker of shard `name`: its own server certificate from the fleet CA (``ca/shard-<name>.{crt,key}``, for
    `hosts`) and the shipped mosquitto configuration around it in `out`; returns mosquitto.conf. Every shard trusts
    the same fleet CA and reads the same CRL (copy ``crl.pem`` to each shard host after a revocation)."""
    if not BATCH_RE.fullmatch(name):
        raise CaError(f"shard name {name!r}: use 1-42 letters, digits, . _ -")
    crt, key_path = paths.root / f"shard-{name}.crt", paths.root / f"shard-{name}.key"
    if not crt.exists():
        k = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(_load_key(paths.fleet_ca_key), _load_cert(paths.fleet_ca_crt), f"broker-{name}",
                      k.public_key(), days, hosts)
        _write_key(key_path, k)
        crt.write_bytes(_pem(cert))
        _record_issued(paths, cert, "server")
    return render_broker_config(paths, out, port=port, claim_port=claim_port, server_crt=crt, server_key=key_path,
                                **kw)  # type: ignore[arg-type]
