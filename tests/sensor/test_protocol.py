"""Wire-level test vectors (reference §1.9), frame parsing and the re-synchronising framer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hw.sensor.driver import ProductInfo, SystemParameters
from hw.sensor.protocol import (
    Code,
    CommandError,
    FrameError,
    Framer,
    Pid,
    SensorError,
    UnexpectedReply,
    build_frame,
    command_frame,
    data_frames,
    parse_frame,
)

H = "EF 01 FF FF FF FF"
# name, hex frame, (pid, content) it must decode to
VECTORS = [
    ("GenImg", f"{H} 01 00 03 01 00 05", (1, "01")),
    ("ACK ok", f"{H} 07 00 03 00 00 0A", (7, "00")),
    ("ACK no finger", f"{H} 07 00 03 02 00 0C", (7, "02")),
    ("ACK rx error", f"{H} 07 00 03 01 00 0B", (7, "01")),
    ("Img2Tz buf1", f"{H} 01 00 04 02 01 00 08", (1, "02 01")),
    ("Img2Tz buf2", f"{H} 01 00 04 02 02 00 09", (1, "02 02")),
    ("RegModel", f"{H} 01 00 03 05 00 09", (1, "05")),
    ("Store buf1 p3", f"{H} 01 00 06 06 01 00 03 00 11", (1, "06 01 00 03")),
    ("LoadChar p3 buf1", f"{H} 01 00 06 07 01 00 03 00 12", (1, "07 01 00 03")),
    ("Search 0..A3", f"{H} 01 00 08 04 01 00 00 00 A3 00 B1", (1, "04 01 00 00 00 A3")),
    ("ACK found p5 s100", f"{H} 07 00 07 00 00 05 00 64 00 77", (7, "00 00 05 00 64")),
    ("ACK not found", f"{H} 07 00 07 09 00 00 00 00 00 17", (7, "09 00 00 00 00")),
    ("Match", f"{H} 01 00 03 03 00 07", (1, "03")),
    ("UpChar buf1", f"{H} 01 00 04 08 01 00 0E", (1, "08 01")),
    ("DownChar buf1", f"{H} 01 00 04 09 01 00 0F", (1, "09 01")),
    ("UpImage", f"{H} 01 00 03 0A 00 0E", (1, "0A")),
    ("DownImage", f"{H} 01 00 03 0B 00 0F", (1, "0B")),
    ("DeletChar p3 n1", f"{H} 01 00 07 0C 00 03 00 01 00 18", (1, "0C 00 03 00 01")),
    ("Empty", f"{H} 01 00 03 0D 00 11", (1, "0D")),
    ("SetSysPara pkt", f"{H} 01 00 05 0E 06 02 00 1C", (1, "0E 06 02")),
    ("SetSysPara baud", f"{H} 01 00 05 0E 04 0C 00 24", (1, "0E 04 0C")),
    ("ReadSysPara", f"{H} 01 00 03 0F 00 13", (1, "0F")),
    ("VfyPwd 0", f"{H} 01 00 07 13 00 00 00 00 00 1B", (1, "13 00 00 00 00")),
    ("TempleteNum", f"{H} 01 00 03 1D 00 21", (1, "1D")),
    ("ReadIndexTable 0", f"{H} 01 00 04 1F 00 00 24", (1, "1F 00")),
    ("GetRandomCode", f"{H} 01 00 03 14 00 18", (1, "14")),
    ("HighSpeedSearch", f"{H} 01 00 08 1B 01 00 00 03 E9 01 11", (1, "1B 01 00 00 03 E9")),
    ("GetEcho", f"{H} 01 00 03 53 00 57", (1, "53")),
    ("ACK GetEcho", f"{H} 07 00 03 55 00 5F", (7, "55")),
    ("HandShake", f"{H} 01 00 03 40 00 44", (1, "40")),
    ("SoftRst", f"{H} 01 00 03 3D 00 41", (1, "3D")),
    ("CheckSensor", f"{H} 01 00 03 36 00 3A", (1, "36")),
    ("Aura on red", f"{H} 01 00 07 35 03 80 01 00 00 C1", (1, "35 03 80 01 00")),
    ("ReadProdInfo", f"{H} 01 00 03 3C 00 40", (1, "3C")),
    ("data 128x00", f"{H} 02 00 82 {'00 ' * 128}00 84", (2, "00 " * 128)),
    ("end 128xFF", f"{H} 08 00 82 {'FF ' * 128}80 0A", (8, "FF " * 128)),
]


@pytest.mark.parametrize("name,frame,decoded", VECTORS, ids=[v[0] for v in VECTORS])
def test_reference_vectors(name: str, frame: str, decoded: tuple[int, str]) -> None:
    raw = bytes.fromhex(frame)
    pid, content = decoded[0], bytes.fromhex(decoded[1])
    assert build_frame(pid, content) == raw
    if pid == Pid.COMMAND:
        assert command_frame(content[0], content[1:]) == raw
    pkt = parse_frame(raw)
    assert (pkt.address, pkt.pid, pkt.content) == (0xFFFFFFFF, pid, content)


def test_captured_read_sys_para_ack() -> None:
    """The real ReadSysPara ACK captured from an Adafruit sensor (adafruit#30)."""
    raw = bytes.fromhex(f"{H} 07 00 13 00 00 00 00 00 00 50 00 03 FF FF FF FF 00 02 00 0C 04 77")
    pkt = parse_frame(raw)
    assert pkt.code == Code.OK
    p = SystemParameters.decode(pkt.content[1:])
    got = (p.capacity, p.security_level, p.address, p.packet_size, p.baud)
    assert got == (80, 3, 0xFFFFFFFF, 128, 115200)


@pytest.mark.parametrize("mutate,what", [
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
    (lambda b: b"\xee" + b[1:], "header"),
    (lambda b: b[:6] + b"\x05" + b[7:], "package identifier"),
    (lambda b: b[:-1], "length field"),
    (lambda b: b[:2] + b"\x00\x00\x00\x01" + b[6:], "address"),
])
def test_parse_frame_names_the_problem(mutate, what: str) -> None:
    good = command_frame(0x0F)
    with pytest.raises(FrameError, match=what):
        parse_frame(mutate(good), address=0xFFFFFFFF)


def test_framer_skips_power_up_byte_and_garbage_and_split_reads() -> None:
    ack = bytes.fromhex(f"{H} 07 00 03 00 00 0A")
    fr = Framer()
    stream = b"\x55" + b"\x00\xef\x13garbage" + ack + ack[:5]
    for i in range(0, len(stream), 3):  # three bytes at a time, like a slow read
        fr.feed(stream[i:i + 3])
    assert fr.next_packet() == parse_frame(ack)
    assert fr.next_packet() is None
    fr.feed(ack[5:])
    assert fr.next_packet() == parse_frame(ack)
    assert fr.discarded >= 11


def test_framer_finds_frame_behind_a_bogus_header() -> None:
    """A header whose length swallows the real frame costs one byte, not the frame."""
    ack = bytes.fromhex(f"{H} 07 00 07 09 00 00 00 00 00 17")
    bogus = bytes.fromhex(f"{H} 07 00 10")  # claims 16 bytes, checksum will not match
    fr = Framer()
    fr.feed(bogus + ack + b"\x00" * 16)
    assert fr.next_packet() == parse_frame(ack)
    assert fr.rejected == 1


def test_framer_rejects_other_address_and_long_length() -> None:
    fr = Framer(address=0xFFFFFFFF)
    other = build_frame(Pid.ACK, b"\x00", address=0x12345678)
    too_long = bytes.fromhex(f"{H} 02 01 03") + bytes(259)
    good = build_frame(Pid.ACK, b"\x02")
    fr.feed(other + too_long + good)
    assert fr.next_packet() == parse_frame(good)
    assert fr.rejected == 2


def test_data_frames_split_and_end_marker() -> None:
    data = bytes(range(256)) * 2 + b"\x01\x02\x03"
    frames = data_frames(data, 64)
    pkts = [parse_frame(f) for f in frames]
    assert [p.pid for p in pkts] == [Pid.DATA] * 8 + [Pid.END]
    assert b"".join(p.content for p in pkts) == data
    with pytest.raises(ValueError, match="packet size"):
        data_frames(data, 100)


def test_command_error_types() -> None:
    from hw.sensor import protocol as p

    assert isinstance(CommandError.for_code(0x13), p.PasswordError)
    assert isinstance(CommandError.for_code(0x1F), p.LibraryFull)
    assert isinstance(CommandError.for_code(0x06), p.ImageQualityError)
    assert isinstance(CommandError.for_code(0xFC), p.UnsupportedCommand)
    e = CommandError.for_code(0x99, "Store")
    assert type(e) is CommandError and "0x99" in str(e) and "Store" in str(e)
    for code in Code:
        if code not in (Code.OK, Code.ECHO_OK):
            err = CommandError.for_code(code, "X")
            assert isinstance(err, SensorError) and err.code == code
            assert "unknown" not in str(err)


# --- property tests: only typed errors ever escape --------------------------------------------

frames_st = st.builds(
    lambda pid, content: build_frame(pid, content),
    st.sampled_from([1, 2, 7, 8]), st.binary(min_size=1, max_size=256))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_framer_never_raises_and_only_yields_valid_frames(noise: bytes) -> None:
    fr = Framer(address=None)
    fr.feed(noise)
    while (pkt := fr.next_packet()) is not None:
        assert parse_frame(pkt.to_bytes()) == pkt


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40).filter(lambda b: 0xEF not in b), max_size=6),
       st.lists(frames_st, min_size=1, max_size=6))
def test_framer_recovers_every_frame_between_garbage(garbage: list[bytes], frames: list[bytes]) -> None:
    fr = Framer()
    stream = b""
    for i, f in enumerate(frames):
        stream += (garbage[i] if i < len(garbage) else b"") + f
    fr.feed(stream)
    got = []
    while (pkt := fr.next_packet()) is not None:
        got.append(pkt.to_bytes())
    assert got == frames


@settings(max_examples=200, deadline=None)
@given(frames_st, st.binary(max_size=300), st.integers(0, 5), st.data())
def test_framer_after_corruption(frame: bytes, noise: bytes, flips: int, data: st.DataObject) -> None:
    """Corrupt a frame anywhere; what follows it (after enough bytes) is still found."""
    bad = bytearray(frame)
    for _ in range(flips):
        i = data.draw(st.integers(0, len(bad) - 1))
        bad[i] ^= data.draw(st.integers(1, 255))
    follow = build_frame(Pid.ACK, b"\x00\x01\x02")
    fr = Framer()
    fr.feed(bytes(bad) + noise + bytes(270) + follow)
    got = []
    while (pkt := fr.next_packet()) is not None:
        got.append(pkt)
    assert parse_frame(follow) in got


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoders_raise_only_typed_errors(raw: bytes) -> None:
    for fn in (parse_frame, lambda b: SystemParameters.decode(b[:16]), ProductInfo.decode):
        try:
            fn(raw)
        except (FrameError, UnexpectedReply):
            pass
