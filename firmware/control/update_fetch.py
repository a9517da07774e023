"""The fleet's ``update`` command on the kit: download a bundle, check it, hand it to the updater.

Args (signed with the command): ``url`` (https:// from `rekam-fleet release serve`, checked against the fleet CA
the kit holds; http:// is accepted too, integrity coming from the signatures), ``sha256``, ``size``, ``version``.
The daemon downloads into ``<state_dir>/updates/`` (its own folder; at most ``size`` bytes are read), checks the
SHA-256 named by the command, then verifies the bundle's own fleet signature and the version rules
(`firmware.control.update.Updater.verify`) before it renames it to ``pending.rkup``. The daemon cannot install
(its unit makes /opt read-only): ``rekam-update.path`` sees the pending file and starts ``rekam-update.service``
(root), which runs ``rekam update apply --remove-source`` on it. The outcome reaches the fleet in telemetry
(``update``, from ``/opt/rekam/update/state.json``).

This runs in the daemon (User=rekam), so its verification is a pre-check only, with the key the daemon itself keeps
(``control/fleet.pub``): it saves downloading-then-refusing round trips, it protects nothing. The root updater
verifies its own copy again with the root-owned anchor (`firmware.control.update.root_fleet_key`), never with this
daemon-writable file, so a daemon that wrote its own key there cannot get root to install its bundle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from firmware import config
from firmware.control.claim import ControlPaths
from firmware.control.update import Updater, prefix_from_env
from firmware.errors import Refused
from firmware.store.capacity import spare_bytes
from firmware.system.fsutil import fsync_dir
from firmware.wire import update_bundle as ub

log = logging.getLogger(__name__)

PENDING = "pending.rkup"
READ_TIMEOUT_S = 30.0  # per read: a server that stops sending
# The whole download: a server that trickles (a byte per 29 s would pass the per-read timeout forever) is cut
# off once it falls below a slow rural uplink's rate (16 KiB/s on average) plus a start allowance.
START_ALLOWANCE_S = 120.0
MIN_RATE_BPS = 16 * 1024
SPACE_CHECK_BYTES = 8 * 1024 * 1024  # re-check the SD's spare room this often while downloading


def pending_path(cfg: config.Config) -> Path:
    """Where a downloaded, verified bundle waits for the updater."""
    return cfg.state_dir / "updates" / PENDING


def _args(args: dict[str, Any]) -> tuple[str, str, int, str]:
    url, sha, size, version = args.get("url"), args.get("sha256"), args.get("size"), args.get("version")
    if not isinstance(url, str) or len(url) > 2000 or urlsplit(url).scheme not in ("https", "http") \
            or not urlsplit(url).hostname:
        raise Refused("invalid", "url must be an http(s) URL")
    if not isinstance(sha, str) or not ub.SHA256_RE.fullmatch(sha):
        raise Refused("invalid", "sha256 must be 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= ub.MAX_BUNDLE_BYTES:
        raise Refused("too_large" if isinstance(size, int) and size > 0 else "invalid",
                      f"size must be 1..{ub.MAX_BUNDLE_BYTES}")
    if not isinstance(version, str) or not ub.VERSION_RE.fullmatch(version):
        raise Refused("invalid", "version must be N[.N[.N[.N]]]")
    return url, sha, size, version


def _download(url: str, size: int, dest: Path, ca: Path, spare: Callable[[], int]) -> str:
    """Fetch at most `size` bytes into `dest` (fsync'd); their SHA-256. `spare()`: bytes the SD can give."""
    if spare() < size:
        raise Refused("no_space", f"the bundle ({size} bytes) would take room the records need on the SD")
    deadline = time.monotonic() + START_ALLOWANCE_S + size / MIN_RATE_BPS
    ctx = None
    if urlsplit(url).scheme == "https":
        if not ca.exists():
            raise Refused("no_ca", "no fleet CA certificate to check the server with")
        ctx = ssl.create_default_context(cafile=str(ca))
    h = hashlib.sha256()
    got = 0
    try:
        with urllib.request.urlopen(url, timeout=READ_TIMEOUT_S, context=ctx) as r, open(dest, "wb") as out:
            while chunk := r.read1(min(ub.CHUNK, size + 1 - got)):  # what arrived: the deadline is checked
                got += len(chunk)
                if got > size:
                    raise Refused("size_mismatch", f"the server sends more than the {size} bytes the command names")
                h.update(chunk)
                out.write(chunk)
                if time.monotonic() > deadline:
                    raise Refused("download_failed", f"{url}: too slow ({got} of {size} bytes by the deadline)")
                if got % SPACE_CHECK_BYTES < len(chunk) and spare() < size - got:  # records came first meanwhile
                    raise Refused("no_space", "the records captured meanwhile need the room left on the SD")
            out.flush()
            os.fsync(out.fileno())
    except (urllib.error.URLError, OSError, ssl.SSLError) as e:
        raise Refused("download_failed", f"{url}: {e}") from None
    if got != size:
        raise Refused("size_mismatch", f"downloaded {got} bytes, the command names {size}")
    return h.hexdigest()


def fetch_update(cfg: config.Config, paths: ControlPaths, args: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Run the ``update`` command (see module doc); `Refused` with a code when the bundle is not taken."""
    url, sha, size, version = _args(args)
    folder = pending_path(cfg).parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".download-{os.getpid()}-{time.monotonic_ns()}"
    try:
        digest = _download(url, size, tmp, paths.ca, lambda: spare_bytes(cfg.store, folder))
        if digest != sha:
            raise Refused("hash_mismatch", "the downloaded bundle's SHA-256 differs from the signed command's")
        # The daemon's pre-check (see module doc): root verifies again with the root-owned key.
        up = Updater(prefix_from_env(), cfg.state_dir, paths.pinned_fleet_key(), restart=lambda _t: (False, ""),
                     probe=lambda _v, _u, _t: (False, "", ""))
        m = up.verify(tmp)
        if m.version != version:
            raise Refused("version_mismatch", f"the bundle is {m.version}, the command names {version}")
        os.replace(tmp, pending_path(cfg))
        fsync_dir(folder)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("update downloaded version=%s size=%d; waiting for the updater", version, size)
    return {"version": version, "pending": str(pending_path(cfg))}, f"update {version} downloaded; installing"
