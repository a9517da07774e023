"""Untrusted-input primitives: safe opens beneath a root and bounded JSON (real files, real FIFOs)."""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest

from firmware.errors import ProtocolError, UntrustedFile
from firmware.system.fsutil import open_dir_beneath, read_untrusted, sha256_untrusted
from firmware.wire import safejson


def test_regular_file_reads(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"hello")
    assert read_untrusted(tmp_path, "a/f", 10) == b"hello"
    digest, n = sha256_untrusted(tmp_path, "a/f", 10)
    assert n == 5 and len(digest) == 64


def test_symlinked_file_and_directory_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("identity")
    root = tmp_path / "stick"
    (root / "d").mkdir(parents=True)
    (root / "d" / "link").symlink_to(secret)
    (root / "dirlink").symlink_to(tmp_path)
    with pytest.raises(UntrustedFile) as e:
        read_untrusted(root, "d/link", 100)
    assert e.value.errno == errno.ELOOP
    with pytest.raises(UntrustedFile):
        read_untrusted(root, "dirlink/secret", 100)
    with pytest.raises(UntrustedFile):
        open_dir_beneath(root, "dirlink")
    with pytest.raises(UntrustedFile):
        read_untrusted(root, "../secret", 100)


def test_fifo_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    done = threading.Event()

    def attempt():
        with pytest.raises(UntrustedFile):
            read_untrusted(tmp_path, "fifo", 100)
        done.set()

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    assert done.wait(5), "opening a FIFO blocked"


def test_size_cap_checked_before_reading(tmp_path):
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(3 << 30)  # 3 GiB sparse: refused from fstat, nothing read
    with pytest.raises(UntrustedFile) as e:
        read_untrusted(tmp_path, "sparse", 1 << 20)
    assert e.value.errno == errno.EFBIG
    with pytest.raises(UntrustedFile):
        read_untrusted(tmp_path.parent, f"{tmp_path.name}/sparse", 10)


def test_device_refused(tmp_path):
    os.symlink("/dev/zero", tmp_path / "z")
    with pytest.raises(UntrustedFile):
        read_untrusted(tmp_path, "z", 100)
    with pytest.raises(UntrustedFile):
        read_untrusted(__import__("pathlib").Path("/dev"), "zero", 100)


@pytest.mark.parametrize("doc,reason", [
    (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
    (b'{"a":' * 50 + b"1" + b"}" * 50, "too_deep"),
    (b'{"x": NaN}', "not_json"),
    (b'{"x": Infinity}', "not_json"),
    (b"\xff\xfe", "not_json"),
    (b"{" , "not_json"),
    (b" " * 2000, "too_large"),
])
def test_bounded_json_refuses(doc, reason):
    with pytest.raises(ProtocolError) as e:
        safejson.loads(doc, max_bytes=1000 if reason == "too_large" else 1 << 20, what="ack")
    assert e.value.reason == reason
    assert "ack" in str(e.value)


def test_bounded_json_ignores_brackets_in_strings():
    doc = '{"s": "' + "[" * 1000 + '\\"]"}'
    assert safejson.loads(doc, max_bytes=1 << 16)["s"].startswith("[[")
    assert safejson.depth('[[1], {"a": [2]}]') == 3
    with pytest.raises(ProtocolError):
        safejson.loads_object(b"[1]", max_bytes=100)


def test_depth_scan_of_an_unterminated_string_is_one_match():
    """`"\\"\\"\\"...` without a closing quote: the scan must take it as one token, not restart at every escaped
    quote (the old pattern did, quadratic: 16 KiB took 2.3 s, a 64 KiB kit.json about 36 s)."""
    doc = '{"a": [' + '"' + '\\"' * 200_000
    assert [m.group()[:1] for m in safejson._TOKENS.finditer(doc)] == ["{", '"', "[", '"']
    assert safejson.depth(doc) == 2
    with pytest.raises(ProtocolError) as e:
        safejson.loads(doc, max_bytes=1 << 20)
    assert e.value.reason == "not_json"


def test_a_fifo_or_device_is_refused_without_being_opened(tmp_path):
    """Refused from an O_PATH descriptor's fstat, never opened: a device's open can act (a watchdog arms, a tape
    rewinds). Seen from a FIFO: a writer blocked in open() would be woken by any reader's open."""
    fifo = tmp_path / "index.jsonl"
    os.mkfifo(fifo)
    opened = threading.Event()

    def writer() -> None:
        fd = os.open(fifo, os.O_WRONLY)  # blocks until someone opens the FIFO for reading
        opened.set()
        os.close(fd)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    with pytest.raises(UntrustedFile) as e:
        read_untrusted(tmp_path, "index.jsonl", 100)
    assert e.value.errno == errno.EINVAL and not opened.wait(0.5)
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # release the writer
    assert opened.wait(5)
    os.mknod(tmp_path / "node", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(UntrustedFile):
        read_untrusted(tmp_path, "node", 100)
