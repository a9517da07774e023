"""Records for the export tests: sealed by a real `rekamd --sim` (enrollments through its API, corpus images),
archived in a real archive; helpers to reseal variants (old manifest, hostile manifests) with the kit's key."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from firmware.seal import identity
from firmware.wire import record_format as rf
from provisioning.archive import Archive
from tests.console.conftest import NIK_FEMALE, NIK_MALE, enroll, write_config
from tests.support import Rekamd, subprocess_env

FINGERS = ["R1", "R2", "L1", "L2"]
EXPORT = (sys.executable, "-m", "provisioning.cli", "export")
AGENCY = "IDDUKCAPIL"


@dataclass
class Kit:
    """The records one simulated kit sealed, its signing identity and the data-center key."""

    root: Path
    ident: identity.KitIdentity
    dc_sk: Any
    dc_pub: Path
    dc_key: Path
    records: dict[str, bytes]  # name -> sealed bytes ("full", "two_exceptions")

    def open(self, data: bytes) -> tuple[rf.Header, rf.Payload]:
        hdr, plain = rf.open_record(data, self.dc_sk)
        return hdr, rf.Payload.decode(plain)

    def reseal(self, data: bytes, seq: int, manifest: dict[str, Any] | None = None,
               attachments: list[rf.Attachment] | None = None, clock_synced: bool | None = None,
               raw: dict[bytes, bytes] | None = None) -> bytes:
        """`data`'s payload (or the given manifest/attachments) sealed again by the kit as sequence `seq`
        (`clock_synced`: the header's flag instead of `data`'s; `raw`: same-length byte replacements in the
        encoded payload, for JSON a kit's canonical encoder cannot write, e.g. the escape of a lone surrogate)."""
        hdr, p = self.open(data)
        m = manifest if manifest is not None else p.manifest
        atts = attachments if attachments is not None else p.attachments
        rid = f"{self.ident.kit_id}-{seq:08d}-{hdr.created.replace('-', '').replace(':', '')}"
        payload = rf.Payload(m, atts).encode()
        for old, new in (raw or {}).items():
            assert len(old) == len(new) and old in payload, old
            payload = payload.replace(old, new)
        return rf.seal(payload, record_id=rid, kit_id=self.ident.kit_id, seq=seq,
                       created=hdr.created, clock_synced=hdr.clock_synced if clock_synced is None else clock_synced,
                       signing_key=self.ident.signing_key,
                       recipients=[rf.load_recipient_key(self.dc_pub.read_bytes())])

    def archive(self, path: Path, records: list[bytes]) -> Archive:
        a = Archive(path)
        a.register_kit(self.ident.kit_id, self.ident.public_key_b64)
        for data in records:
            r = a.store(data, self.ident.kit_id, "test")
            assert r.status == "stored", r
        return a


_MADE: dict[tuple[str, str], Kit] = {}


def shared_sim_kit(tmp_path_factory: Any, dc: dict[str, Any], corpus: Path) -> Kit:
    """`sim_kit` once per test session (its records are only read; both export test files share them)."""
    k = (str(dc["pub_path"]), str(corpus))
    if k not in _MADE:
        _MADE[k] = sim_kit(tmp_path_factory.mktemp("kit"), dc, corpus)
    return _MADE[k]


def sim_kit(root: Path, dc: dict[str, Any], corpus: Path) -> Kit:
    """Two enrollments by a real rekamd --sim: every finger and the face captured, and one with two finger
    exceptions (L1 missing, L2 bandaged)."""
    cfg = write_config(root, dc["pub_path"], corpus, fingers=FINGERS, dedup=[])
    with Rekamd(cfg, root / "rekamd.log") as d:
        d.start()
        import httpx

        c = httpx.Client(base_url=d.url, timeout=60)
        r = c.post("/api/v1/auth/signin", json={"operator_id": "demo", "pin": "123456"})
        assert r.status_code == 200, r.text
        c.headers["Authorization"] = f"Bearer {r.json()['token']}"
        full = enroll(c, NIK_MALE)["record_id"]
        r = c.post("/api/v1/enrollment", json={"nik": NIK_FEMALE, "override_reason": ""})
        assert r.status_code == 200, r.text
        for code, why in (("L1", "missing"), ("L2", "bandaged")):
            r = c.post(f"/api/v1/enrollment/fingers/{code}/exception", json={"reason": why})
            assert r.status_code == 200, r.text
        two = enroll(c, NIK_FEMALE, start=False)["record_id"]
    sd = root / "sd"
    recs = {"full": (sd / "records" / f"{full}.rkm").read_bytes(),
            "two_exceptions": (sd / "records" / f"{two}.rkm").read_bytes()}
    return Kit(root, identity.load_or_create(sd), dc["sk"], dc["pub_path"], dc["key_path"], recs)


def old_manifest(m: dict[str, Any]) -> dict[str, Any]:
    """The same enrollment as `rekam.enrollment/1` wrote it (before the export: no `ppi`)."""
    out = dict(m, schema="rekam.enrollment/1")
    out["fingers"] = [{k: v for k, v in f.items() if k != "ppi"} for f in m["fingers"]]
    return out


def pixels(png_or_image: bytes) -> np.ndarray:
    from PIL import Image

    im = Image.open(io.BytesIO(png_or_image))
    im.load()
    return np.array(im)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def export(archive: Path, kit: Kit, out: Path, fmt: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXPORT, "--archive", str(archive), "--key", str(kit.dc_key), "--format", fmt,
                           "--out", str(out), "--agency", AGENCY, "--json", *args],
                          capture_output=True, text=True, timeout=120, env=subprocess_env({"REKAM_LANG": "en"}))
