"""The unit files: `systemd-analyze verify` clean, rekamd's sandbox rated <= 2.0, commands they run exist."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.system.conftest import REPO, SYSTEMD_DIR, need_tool

UNITS = sorted(p.name for p in SYSTEMD_DIR.iterdir() if p.suffix in (".service", ".path", ".timer"))
VENV = REPO / ".venv"


def _staged(tmp_path: Path) -> Path:
    """Copies of every unit with /opt/rekam/venv pointing at the repo's venv (verify needs real binaries)."""
    d = tmp_path / "units"
    d.mkdir()
    for name in UNITS:
        (d / name).write_text((SYSTEMD_DIR / name).read_text().replace("/opt/rekam/venv", str(VENV))
                              .replace("/opt/rekam/current", str(VENV)).replace("/opt/rekam/previous", str(VENV)))
    # A template is checked through an instance, as udev would start it.
    (d / "rekam-usb-mount@sda1.service").write_text((d / "rekam-usb-mount@.service").read_text())
    return d


def test_expected_units_present() -> None:
    assert {"rekamd.service", "rekam-firstboot.service", "rekam-usb-mount@.service", "rekam-usb-eject.path",
            "rekam-usb-eject.service", "rekam-ingest.service", "rekam-archive-check.service",
            "rekam-archive-check.timer"} <= set(UNITS)


@pytest.mark.parametrize("name", [*UNITS, "rekam-usb-mount@sda1.service"])
def test_verify_clean(name: str, tmp_path: Path) -> None:
    tool = need_tool("systemd-analyze", "systemd")
    d = _staged(tmp_path)
    r = subprocess.run([tool, "verify", "--man=no", str(d / name)], capture_output=True, text=True, timeout=60,
                       cwd=d)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_verify_catches_a_missing_binary(tmp_path: Path) -> None:
    """The check above can fail: the unchanged unit names /opt/rekam/current, absent here."""
    tool = need_tool("systemd-analyze", "systemd")
    if Path("/opt/rekam/current/bin/rekamd").exists():
        pytest.skip("rekam is installed on this machine")
    r = subprocess.run([tool, "verify", "--man=no", str(SYSTEMD_DIR / "rekamd.service")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "/opt/rekam/current/bin/rekamd" in r.stderr


def exposure(unit: Path) -> float:
    tool = need_tool("systemd-analyze", "systemd")
    r = subprocess.run([tool, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True,
                       text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert m, f"no exposure figure in: {r.stdout[-500:]} {r.stderr}"
    return float(m.group(1))


def test_rekamd_exposure_at_most_2() -> None:
    level = exposure(SYSTEMD_DIR / "rekamd.service")
    print(f"rekamd.service exposure {level}")
    assert level <= 2.0


def test_exposure_figure_reacts(tmp_path: Path) -> None:
    """Dropping the sandbox raises the figure: the parser reads the real number."""
    loose = tmp_path / "rekamd.service"
    keep = ("Type=", "ExecStart=", "User=", "Group=", "[Unit]", "[Service]", "[Install]", "WantedBy=")
    loose.write_text("\n".join(line for line in (SYSTEMD_DIR / "rekamd.service").read_text().splitlines()
                               if line.startswith(keep)) + "\n")
    assert exposure(loose) > 5.0


def _directives(name: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in (SYSTEMD_DIR / name).read_text().splitlines()
            if line.startswith(key + "=")]


def test_rekamd_contract() -> None:
    """What the daemon relies on: notify, watchdog, its dirs, the stick path, the config path."""
    get = lambda k: _directives("rekamd.service", k)  # noqa: E731
    assert get("Type") == ["notify"] and get("Restart") == ["always"] and get("User") == ["rekam"]
    assert int(get("WatchdogSec")[0]) >= 10
    assert get("StateDirectory") == ["rekam"] and get("ConfigurationDirectory") == ["rekam"]
    assert get("RuntimeDirectory") == ["rekam"]  # /run/rekam/usb-eject lives there
    assert get("ReadWritePaths") == ["-/media"]  # the parent of [usb] mount_point: see test_propagation.py
    assert get("RestartPreventExitStatus") == ["76 77 78"]
    # A reboot (76) or a battery power-off (77) is no failure: the crash-loop rollback (OnFailure=) must not fire.
    assert get("OnFailure") == ["rekam-rollback.service"] and get("SuccessExitStatus") == ["76 77"]
    assert "EXIT_STATUS" in get("ExecStopPost")[0] and get("ExecStopPost")[0].startswith("+")
    assert shlex.split(get("ExecStart")[0])[1:] == ["--config", "/etc/rekam/rekam.toml"]
    assert "/run/rekam/usb-eject" in _directives("rekam-usb-eject.path", "PathExists")


@pytest.mark.parametrize(("status", "expect"), [("76", "--no-block reboot"), ("77", "--no-block poweroff"),
                                                ("0", ""), ("70", ""), ("78", "")])
def test_exit_status_reboots_or_powers_off(tmp_path: Path, status: str, expect: str) -> None:
    """The unit's ExecStopPost (its one root command) reboots on 76 (signed reboot), powers off on 77 (battery
    safe stop) and does nothing on any other exit: run as written, with a stand-in for systemctl."""
    line = _directives("rekamd.service", "ExecStopPost")[0]
    assert line.startswith("+") and line.count("/usr/bin/systemctl") == 2
    calls = tmp_path / "calls"
    stub = tmp_path / "systemctl"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    stub.chmod(0o755)
    argv = shlex.split(line[1:].replace("/usr/bin/systemctl", str(stub)))
    subprocess.run(argv, env={"EXIT_STATUS": status, "PATH": "/usr/bin:/bin"}, check=True, timeout=10)
    assert (calls.read_text().strip() if calls.exists() else "") == expect


@pytest.mark.parametrize("name", ["rekam-firstboot.service", "rekam-usb-mount@.service", "rekam-usb-eject.service",
                                  "rekam-archive-check.service"])
def test_exec_commands_parse(name: str) -> None:
    """Every ExecStart/ExecStop argument list is accepted by the real argument parser it calls."""
    for line in _directives(name, "ExecStart") + _directives(name, "ExecStop"):
        argv = shlex.split(line.replace("%I", "sda1"))
        prog = Path(argv[0]).name
        if prog == "rekam":
            from firmware.cli.main import build_parser
            build_parser().parse_args(argv[1:])
        elif prog == "rekam-fleet":
            from provisioning.cli import build_parser as fleet_parser
            fleet_parser().parse_args(argv[1:])
        else:
            assert prog == "python" and argv[1:3] == ["-m", "hw.usbstick"]
            from hw.usbstick import build_parser as hw_parser
            hw_parser().parse_args(argv[3:])


def test_udev_rule_shape() -> None:
    rule = (SYSTEMD_DIR / "99-rekam-usb.rules").read_text()
    lines = [ln for ln in rule.splitlines() if ln.strip() and not ln.startswith("#")]
    assert any('SYSTEMD_WANTS}+="rekam-usb-mount@%k.service"' in ln and 'TAG+="systemd"' in ln for ln in lines)
    assert any('ENV{ID_FS_TYPE}!="vfat|exfat|ext4"' in ln for ln in lines)
    assert any('ENV{ID_BUS}!="usb"' in ln for ln in lines)
    # No RUN+= mount: udev's sandbox would hide the mount from the daemon.
    assert not any("RUN" in ln for ln in lines)
    # Every GOTO has its LABEL.
    gotos = set(re.findall(r'GOTO="(\w+)"', rule))
    labels = set(re.findall(r'LABEL="(\w+)"', rule))
    assert gotos and gotos <= labels


def test_journald_dropin_limits() -> None:
    conf = (SYSTEMD_DIR / "journald-rekam.conf").read_text()
    assert "[Journal]" in conf
    m = re.search(r"^SystemMaxUse=(\d+)M$", conf, re.M)
    assert m and int(m.group(1)) <= 128


def test_rekamd_check_config_entry_point() -> None:
    """The venv entry point the unit runs exists and answers."""
    r = subprocess.run([str(VENV / "bin" / "rekamd"), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("rekamd ")


def _expand(name: str, tool: str, cache: dict[str, set[str]]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    if name not in cache:
        out = subprocess.run([tool, "syscall-filter", name], capture_output=True, text=True, timeout=60).stdout
        members: set[str] = set()
        for line in out.splitlines()[1:]:
            item = line.strip()
            if item and not item.startswith("#"):
                members |= _expand(item, tool, cache)
        assert members, f"unknown syscall group {name}"
        cache[name] = members
    return cache[name]


def effective_syscalls(unit: Path) -> set[str]:
    """The allow list SystemCallFilter= lines build, in order (allow adds, ~ removes), as systemd merges them."""
    tool = need_tool("systemd-analyze", "systemd")
    cache: dict[str, set[str]] = {}
    allowed: set[str] = set()
    for line in unit.read_text().splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.split("=", 1)[1]
        deny = value.startswith("~")
        names = set().union(*(_expand(n, tool, cache) for n in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


def test_rekamd_syscalls_cover_what_the_daemon_does() -> None:
    allowed = effective_syscalls(SYSTEMD_DIR / "rekamd.service")
    # adjtimex: clock_synced in every record (firmware/system/clock.py); ioctl: termios on the UART; fsync/fdatasync
    # /renameat2: the store's atomic writes; socket family: API, MQTT, sd_notify; inotify, flock: SQLite/watchers.
    needed = {"adjtimex", "ioctl", "fsync", "fdatasync", "rename", "renameat", "renameat2", "socket", "bind",
              "connect", "sendto", "recvfrom", "listen", "accept4", "mmap", "mprotect", "clone", "clone3", "futex",
              "epoll_wait", "statfs", "fstatfs", "getrandom", "flock", "fcntl", "openat", "unlink", "unlinkat",
              "execve", "wait4", "pipe2", "kill"}
    assert needed <= allowed, sorted(needed - allowed)
    for denied in ("mount", "umount2", "reboot", "init_module", "ptrace", "settimeofday", "clock_settime",
                   "swapon", "setuid", "chown", "bpf", "sched_setscheduler", "iopl"):
        assert denied not in allowed, denied


@pytest.mark.parametrize("status, reboots", [("76", True), ("0", False), ("75", False), ("", False)])
def test_reboot_hook_only_on_status_76(status: str, reboots: bool, tmp_path: Path) -> None:
    """Run the unit's ExecStopPost shell line with a stand-in systemctl that records its arguments."""
    line = _directives("rekamd.service", "ExecStopPost")[0].lstrip("+")
    argv = shlex.split(line)
    fake = tmp_path / "systemctl"
    log = tmp_path / "calls"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(0o755)
    argv[-1] = argv[-1].replace("/usr/bin/systemctl", str(fake))
    r = subprocess.run(argv, env={"EXIT_STATUS": status, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (log.read_text().strip() == "--no-block reboot") if reboots else not log.exists()


def test_ingest_command_line_from_env_file() -> None:
    """rekam-ingest.service's ExecStart, with the shipped EnvironmentFile expanded as systemd does, parses."""
    from provisioning.cli import build_parser as fleet_parser

    env = dict(line.split("=", 1) for line in (SYSTEMD_DIR / "rekam-ingest.env").read_text().splitlines()
               if line and not line.startswith("#"))
    line = _directives("rekam-ingest.service", "ExecStart")[0]
    assert _directives("rekam-ingest.service", "EnvironmentFile") == ["/etc/rekam/ingest.env"]
    # ${VAR}: one argument; $VAR: split on white space (systemd.service(5), "Command lines").
    argv: list[str] = []
    for word in line.split():
        if word.startswith("${"):
            argv.append(env[word[2:-1]])
        elif word.startswith("$"):
            argv += env[word[1:]].split()
        else:
            argv.append(word)
    assert Path(argv[0]).name == "rekam-fleet"
    args = fleet_parser().parse_args(argv[1:])
    assert args.archive == "/var/lib/rekam-dc" and args.broker == [env["REKAM_BROKER"]]


def test_fleet_pin_units() -> None:
    """The updater's root-owned fleet key pin (docs/updates.md): made by root when the claimed key appears or
    changes (PathChanged=, not PathExists=: the file stays and a oneshot would be started again in a loop), and at
    boot; never as the daemon's user; the update units order after it; the crash-loop rollback is gated on the
    updater's window file."""
    from firmware.cli.main import build_parser

    assert {"rekam-fleet-pin.path", "rekam-fleet-pin.service"} <= set(UNITS)
    path = lambda k: _directives("rekam-fleet-pin.path", k)  # noqa: E731
    assert path("PathChanged") == ["/var/lib/rekam/control/fleet.pub"] and not path("PathExists")
    assert path("Unit") == ["rekam-fleet-pin.service"] and path("WantedBy") == ["multi-user.target"]
    svc = lambda k: _directives("rekam-fleet-pin.service", k)  # noqa: E731
    assert not svc("User") and svc("Type") == ["oneshot"] and svc("WantedBy") == ["multi-user.target"]
    assert svc("ConditionPathExists") == ["/var/lib/rekam/control/fleet.pub"]
    argv = shlex.split(svc("ExecStart")[0])
    assert argv[1:] == ["--config", "/etc/rekam/rekam.toml", "update", "pin-fleet-key"]
    assert build_parser().parse_args(argv[1:]).func.__name__ == "cmd_pin_fleet_key"
    assert svc("ReadWritePaths") == ["/etc/rekam"]  # where the pin goes, nothing else
    for name in ("rekam-update.service", "rekam-update-stick.service"):
        assert "rekam-fleet-pin.service" in _directives(name, "After")
    cond = _directives("rekam-rollback.service", "ExecCondition")
    assert len(cond) == 1 and "/opt/rekam/update/rollback-window" in cond[0] and "boot_id" in cond[0]
