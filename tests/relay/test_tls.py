"""mqtts:// with a private CA and client certificates (mutual TLS), as in the field."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.relay.conftest import assert_delivered_once, wait_for
from tests.support import BrokerTls


def _cert(name: str, issuer_key, issuer_name, key, ca: bool = False, ip: str | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(d: Path, name: str, cert: x509.Certificate, key) -> tuple[str, str]:
    c, k = d / f"{name}.crt", d / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return str(c), str(k)


def test_mutual_tls(mosquitto_factory, make_kit, make_ingest, tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rekam test CA")])
    ca = _cert("rekam test CA", ca_key, ca_name, ca_key, ca=True)
    ca_file, _ = _write(d, "ca", ca, ca_key)
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("broker", "kit", "fleet")}
    broker_crt, broker_key = _write(d, "broker", _cert("broker", ca_key, ca_name, keys["broker"], ip="127.0.0.1"),
                                    keys["broker"])
    kit_crt, kit_key = _write(d, "kit", _cert("rk-tlskit", ca_key, ca_name, keys["kit"]), keys["kit"])
    fleet_crt, fleet_key = _write(d, "fleet", _cert("fleet", ca_key, ca_name, keys["fleet"]), keys["fleet"])
    broker = mosquitto_factory(tls=BrokerTls(ca_file, broker_crt, broker_key, use_identity_as_username=True))
    url = f"mqtts://127.0.0.1:{broker.port}"
    make_ingest(url, ca_file=ca_file, cert_file=fleet_crt, key_file=fleet_key)
    kit = make_kit([url], ca_file=ca_file, cert_file=kit_crt, key_file=kit_key)
    ids = kit.capture(4)
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 4, 20, "all acked over mutual TLS")
    assert_delivered_once(kit, tmp_path / "archive", ids)
    assert relay.status()["broker"] == url


def test_tls_without_client_certificate_is_refused(mosquitto_factory, make_kit, tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rekam test CA")])
    ca_file, _ = _write(d, "ca", _cert("rekam test CA", ca_key, ca_name, ca_key, ca=True), ca_key)
    bk = ec.generate_private_key(ec.SECP256R1())
    broker_crt, broker_key = _write(d, "broker", _cert("broker", ca_key, ca_name, bk, ip="127.0.0.1"), bk)
    broker = mosquitto_factory(tls=BrokerTls(ca_file, broker_crt, broker_key))
    kit = make_kit([f"mqtts://127.0.0.1:{broker.port}"], ca_file=ca_file)
    kit.capture(1)
    relay = kit.start_relay()
    wait_for(lambda: bool(relay.status()["last_error"]), 10, "a connection error")
    assert relay.status()["state"] != "connected" and kit.counts()["stored"] == 1
