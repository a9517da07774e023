"""The kit's update download is bounded: it never takes the room records need on the SD, and a server that
trickles bytes is cut off by an overall deadline (not only the per-read timeout). A real HTTP server, a real
size-limited tmpfs as the SD."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware import config
from firmware.control import update_fetch
from firmware.control.claim import ControlPaths
from firmware.errors import Refused
from firmware.store.capacity import spare_bytes
from firmware.system.fsutil import space

SIZE = 3 * 1024 * 1024


class _Handler(http.server.BaseHTTPRequestHandler):
    delay = 0.0  # seconds between 1 KiB pieces (0: all at once)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", str(SIZE))
        self.end_headers()
        piece = b"\0" * 1024
        try:
            for _ in range(SIZE // len(piece)):
                self.wfile.write(piece)
                if self.delay:
                    self.wfile.flush()
                    time.sleep(self.delay)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the kit gave up: what the test wants

    def log_message(self, *_a: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("H", (_Handler,), {})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/b.rkup", handler
    finally:
        srv.shutdown()
        srv.server_close()


def _cfg(sd: Path, tmp: Path) -> config.Config:
    return config.validate({"kit": {"state_dir": str(sd)}, "datacenter": {"public_key_files": []},
                            "usb": {"mount_point": str(tmp / "usb"), "require_mountpoint": False},
                            "store": {"reserve_floor_mb": 1, "journal_reserve_mb": 1, "max_record_mb": 2,
                                      "warn_records": 5, "resume_records": 2}})


def _args(url: str) -> dict[str, object]:
    return {"url": url, "sha256": "0" * 64, "size": SIZE, "version": "9.0.0"}


def test_no_download_into_the_room_records_need(tmp_path: Path, tmpfs, server) -> None:
    sd = tmpfs.mount(tmp_path / "sd", 12 * 1024)  # 12 MiB: reserve (2) + a maximal record (2) + 5 typical
    cfg = _cfg(sd, tmp_path)
    spare = spare_bytes(cfg.store, sd)
    assert spare > SIZE
    (sd / "filler").write_bytes(b"\1" * (spare - SIZE // 2))  # records captured meanwhile, say
    # The bundle would still fit on the SD, but only in the room kept for records.
    assert space(sd).free_bytes > 2 * SIZE and spare_bytes(cfg.store, sd) < SIZE
    with pytest.raises(Refused) as e:
        update_fetch.fetch_update(cfg, ControlPaths.of(cfg), _args(server[0]))
    assert e.value.reason == "no_space", e.value
    assert not list((sd / "updates").glob("*")), "a partial download was left on the SD"
    # With the room there the same download goes through to the hash check (the bytes are not the bundle).
    (sd / "filler").unlink()
    with pytest.raises(Refused) as e:
        update_fetch.fetch_update(cfg, ControlPaths.of(cfg), _args(server[0]))
    assert e.value.reason == "hash_mismatch", e.value


def test_a_trickling_server_is_cut_off_by_the_deadline(tmp_path: Path, server, monkeypatch) -> None:
    url, handler = server
    handler.delay = 0.05  # 20 KiB/s: each read arrives well within the 30 s per-read timeout
    monkeypatch.setattr(update_fetch, "START_ALLOWANCE_S", 1.0)
    monkeypatch.setattr(update_fetch, "MIN_RATE_BPS", 10 * 1024 * 1024)  # the deadline: ~1.3 s for 3 MiB
    cfg = _cfg(tmp_path / "sd", tmp_path)
    t = time.monotonic()
    with pytest.raises(Refused) as e:
        update_fetch.fetch_update(cfg, ControlPaths.of(cfg), _args(url))
    took = time.monotonic() - t
    assert e.value.reason == "download_failed" and "too slow" in str(e.value), e.value
    assert took < 10, f"cut off after {took:.1f} s"
    assert not list((tmp_path / "sd" / "updates").glob("*"))
