"""The fleet key certificate (`firmware.wire.fleet_key_cert`): what the fleet CA makes passes, nothing else does,
whoever else signs it and whatever it says. Real certificates from the real CA code; the forgeries are built with
the same library a forger would use."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firmware.errors import ProtocolError
from firmware.wire import fleet_key_cert as fkc
from provisioning import ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ca.CaPaths:
    return ca.init_ca(tmp_path_factory.mktemp("fkc") / "ca", ["127.0.0.1"], batch="test")


def _cas(paths: ca.CaPaths) -> list[x509.Certificate]:
    return fkc.load_ca_certificates(paths.fleet_ca_crt.read_bytes(), str(paths.fleet_ca_crt))


def _refused(pem: bytes, cas: list[x509.Certificate], key: object, match: str, **kw: object) -> None:
    with pytest.raises(ProtocolError) as e:
        fkc.check(pem, cas, key, **kw)  # type: ignore[arg-type]
    assert e.value.reason == "uncertified_fleet_key" and match in str(e.value), e.value


def _forge(ca_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, public_key: object, *, eku: list | None = None,
           eku_critical: bool = True, is_ca: bool = False, cn: str = fkc.SUBJECT_CN,
           days: tuple[float, float] = (-1, 30)) -> bytes:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rekam fleet"),
                                  x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
         .not_valid_before(now + dt.timedelta(days=days[0])).not_valid_after(now + dt.timedelta(days=days[1]))
         .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if eku is not False:
        b = b.add_extension(x509.ExtendedKeyUsage(eku or [fkc.EKU_FLEET_KEY]), critical=eku_critical)
    return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_the_fleet_cas_certificate_passes_and_names_its_key(pki: ca.CaPaths) -> None:
    fleet = Ed25519PrivateKey.generate().public_key()
    pem = ca.certify_fleet_key(pki, fleet)
    assert pki.fleet_key_crt.read_bytes() == pem and pki.fleet_key_crt.stat().st_mode & 0o777 == 0o644
    cert = fkc.check(pem, _cas(pki), fleet)
    assert cert.not_valid_after_utc == x509.load_pem_x509_certificate(pki.fleet_ca_crt.read_bytes()).not_valid_after_utc
    # another key offered with it (the daemon's own, next to the genuine certificate it copied)
    _refused(pem, _cas(pki), Ed25519PrivateKey.generate().public_key(), "not the fleet key offered")
    # the CA file may hold several CAs (a change-over): any of them may have issued it; a leaf in it is no CA
    other = ca.init_ca(pki.root.parent / "other", ["127.0.0.1"], batch="test")
    both = other.fleet_ca_crt.read_bytes() + pki.fleet_ca_crt.read_bytes() + pki.server_crt.read_bytes()
    assert len(fkc.load_ca_certificates(both, "both")) == 2
    fkc.check(pem, fkc.load_ca_certificates(both, "both"), fleet)
    _refused(pem, _cas(other), fleet, "not issued by the fleet CA of this kit")
    # dates by the kit's clock
    _refused(pem, _cas(pki), fleet, "the clock says", now=dt.datetime(1970, 1, 1, tzinfo=dt.UTC))


def test_nothing_else_passes_as_a_fleet_key_certificate(pki: ca.CaPaths) -> None:
    cas = _cas(pki)
    ca_key = serialization.load_pem_private_key(pki.fleet_ca_key.read_bytes(), password=None)
    issuer = cas[0].subject
    fleet = Ed25519PrivateKey.generate().public_key()
    # A forger's own CA with the same name: the signature does not verify.
    rogue = ec.generate_private_key(ec.SECP256R1())
    _refused(_forge(rogue, issuer, fleet), cas, fleet, "not issued by the fleet CA")
    # Even the fleet CA's key cannot make these pass: wrong usage, non-critical usage, extra usage, no usage, CA,
    # another subject, expired, not yet valid.
    for kw, match in (({"eku": [ExtendedKeyUsageOID.CLIENT_AUTH]}, "extended key usage"),
                      ({"eku_critical": False}, "extended key usage"),
                      ({"eku": [fkc.EKU_FLEET_KEY, ExtendedKeyUsageOID.CODE_SIGNING]}, "extended key usage"),
                      ({"eku": False}, "lacks the"),
                      ({"is_ca": True}, "is a CA certificate"),
                      ({"cn": "rk-0001"}, "expected CN="),
                      ({"days": (-30, -1)}, "the clock says"),
                      ({"days": (1, 30)}, "the clock says")):
        _refused(_forge(ca_key, issuer, fleet, **kw), cas, fleet, match)  # type: ignore[arg-type]
    # A kit's certificate from its CSR is for an EC key (the CA signs no other CSR), with clientAuth.
    kit_pem, _ = ca.sign_csr(pki, ca.make_csr("rk-0001", ec.generate_private_key(ec.SECP256R1())), "rk-0001")
    _refused(kit_pem, cas, fleet, "not an Ed25519 key")
    _refused(pki.server_crt.read_bytes(), cas, fleet, "not an Ed25519 key")
    # garbage, and sizes
    _refused(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", cas, fleet, "not a PEM certificate")
    _refused(b"x" * (fkc.MAX_CERT_BYTES + 1), cas, fleet, "more than")
    for bad, match in ((b"", "not a PEM certificate file"), (pki.server_crt.read_bytes(), "holds no CA"),
                       (b"x" * (fkc.MAX_CA_BYTES + 1), "more than")):
        with pytest.raises(ProtocolError, match=match):
            fkc.load_ca_certificates(bad, "ca")


def test_a_fleet_folder_without_the_certificate_gets_one(tmp_path: Path) -> None:
    from provisioning.registry import Fleet

    f = Fleet.init(tmp_path / "fleet", ["127.0.0.1:1"], ["127.0.0.1:2"], ["127.0.0.1"], batch="test")
    cas = _cas(f.ca)
    from firmware.wire import control_protocol as cp

    fleet_key = cp.load_public_b64(f.public_key_b64)
    fkc.check(f.ca.fleet_key_crt.read_bytes(), cas, fleet_key)
    f.ca.fleet_key_crt.unlink()  # a folder made before this certificate existed
    f2 = Fleet(f.data)
    fkc.check(f2.ca.fleet_key_crt.read_bytes(), cas, fleet_key)
