"""Every command against the simulator over a real pty + pyserial, every packet size, both geometries."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from hw.sensor import protocol as p
from hw.sensor.driver import LedColor, LedMode, WaitResult
from hw.sensor.image import pack_4bit
from hw.sensor.simulator import decode_template

pytestmark = pytest.mark.timeout(60)  # nothing here may hang

PROFILES = {"r307": ((288, 256), 512, 1000), "r503": ((192, 192), 1536, 200)}


def _pattern(shape: tuple[int, int]) -> np.ndarray:
    """A known image with every gray level and odd/even pixel differences (tests nibble order)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    return (((xx * 7 + yy * 3) % 16) * 17).astype(np.uint8)


@pytest.mark.parametrize("packet_size", [32, 64, 128, 256])
@pytest.mark.parametrize("profile", ["r307", "r503"])
def test_all_commands_round_trip(make_sim, make_fp, profile: str, packet_size: int) -> None:
    shape, tsize, capacity = PROFILES[profile]
    sim = make_sim(profile, packet_size=packet_size)
    fp = make_fp(sim.port)
    params = fp.params
    assert (params.capacity, params.packet_size, params.baud) == (capacity, packet_size, 115200)
    assert fp.handshake()

    # image: known pattern on the glass -> GenImg -> UpImage, byte-exact
    pattern = _pattern(shape)
    sim.present_image(pattern)
    assert fp.capture_image() is True
    img = fp.upload_image()
    assert img.shape == shape and np.array_equal(img, pattern)
    # DownImage of another image, read back byte-exact
    other = 255 - pattern
    fp.download_image(other)
    assert np.array_equal(fp.upload_image(), other)
    assert fp.read_system_parameters().image_in_buffer

    # enrol alice's finger 3 into slot 7 (two impressions), search, match, index table
    sim.present_finger("alice", 3)
    assert fp.capture_image()
    fp.image_to_template(1)
    sim.lift_finger()
    assert fp.capture_image() is False
    sim.present_finger("alice", 3)
    assert fp.capture_image()
    fp.image_to_template(2)
    m = fp.match()
    assert m.matched and m.score >= 50
    fp.create_model()
    fp.store(7, 1)
    assert fp.template_count() == 1
    assert fp.read_index_table(0) == [7]
    assert fp.used_slots() == [7]
    sim.present_finger("alice", 3)
    fp.capture_image()
    fp.image_to_template(1)
    hit = fp.search()
    assert hit is not None and hit.page == 7 and hit.score >= 50
    assert fp.search(high_speed=True).page == 7
    assert fp.search(start=8, count=10) is None  # slot 7 outside the range

    # a different finger: Match says no, Search finds nothing (results, not exceptions)
    sim.present_finger("bob", 3)
    fp.capture_image()
    fp.image_to_template(2)
    fp.load(7, 1)
    m = fp.match()
    assert not m.matched and m.score < 50
    assert fp.search(buffer=2) is None

    # template export -> Empty -> import -> Search finds it
    fp.load(7, 1)
    tpl = fp.upload_template(1)
    assert len(tpl) == tsize and decode_template(tpl) is not None
    assert fp.upload_template(1) == tpl  # stable across reads
    fp.empty()
    assert fp.template_count() == 0
    fp.download_template(tpl, 2)
    fp.store(11, 2)
    sim.present_finger("alice", 3)
    fp.capture_image()
    fp.image_to_template(1)
    assert fp.search().page == 11
    fp.load(11, 1)
    assert fp.upload_template(1) == tpl

    # library edges: out of range, empty slot, delete
    with pytest.raises(p.BadLocation):
        fp.store(capacity, 1)
    with pytest.raises(p.TemplateError):
        fp.load(12, 1)
    with pytest.raises(p.LibraryError):
        fp.delete(capacity - 1, 5)
    fp.delete(11)
    assert fp.template_count() == 0

    # parameters: security level and packet size written and read back
    fp.set_security_level(4)
    assert fp.params.security_level == 4
    new_size = 64 if packet_size != 64 else 256
    fp.set_packet_size(new_size)
    assert fp.params.packet_size == new_size and sim.packet_size == new_size
    sim.present_image(pattern)
    fp.capture_image()
    assert np.array_equal(fp.upload_image(), pattern)


def test_r503_extras(make_sim, make_fp) -> None:
    sim = make_sim("r503")
    fp = make_fp(sim.port)
    assert fp.product is not None and fp.product.model == "R503"
    assert (fp.product.width, fp.product.height, fp.product.template_size) == (192, 192, 1536)
    assert fp.info().model == "R503" and fp.info().geometry == "192x192"
    fp.set_led(LedMode.BREATHING, 0x40, LedColor.PURPLE, 3)
    assert sim.led == (1, 0x40, 3, 3)
    fp.soft_reset()
    assert fp.template_count() == 0  # works after the reboot and its 0x55 byte


def test_r307_has_no_led_ring(fp) -> None:
    with pytest.raises(p.PacketReceiveError, match="AURA_LED_CONFIG"):
        fp.set_led(LedMode.ON)
    assert fp.product is None
    assert fp.template_count() == 0  # the stream is still in step


def test_wait_for_finger_poll_cancel_timeout_and_lift(sim, fp) -> None:
    cancel = threading.Event()
    t0 = time.monotonic()
    assert fp.wait_for_finger(timeout=0.3, poll_s=0.05) is WaitResult.TIMEOUT
    assert 0.3 <= time.monotonic() - t0 < 1.0
    threading.Timer(0.2, cancel.set).start()
    assert fp.wait_for_finger(timeout=5, cancel=cancel, poll_s=0.05) is WaitResult.CANCELLED
    threading.Timer(0.2, sim.present_finger, args=("carol", 0)).start()
    assert fp.wait_for_finger(timeout=5, poll_s=0.05) is WaitResult.CAPTURED
    assert fp.wait_for_lift(timeout=0.3, poll_s=0.05) is WaitResult.TIMEOUT
    threading.Timer(0.2, sim.lift_finger).start()
    assert fp.wait_for_lift(timeout=5, poll_s=0.05) is WaitResult.LIFTED


def test_touch_line_keeps_uart_quiet_until_touched(sim, fp) -> None:
    touched = threading.Event()
    sim.present_finger("dave", 1)
    before = sim.stats.by_instruction.get("GEN_IMG", 0)
    assert fp.wait_for_finger(timeout=0.3, poll_s=0.05, touch=touched) is WaitResult.TIMEOUT
    assert sim.stats.by_instruction.get("GEN_IMG", 0) == before  # no polling without a touch
    threading.Timer(0.1, touched.set).start()
    assert fp.wait_for_finger(timeout=5, poll_s=0.05, touch=touched) is WaitResult.CAPTURED
    assert fp.wait_for_lift(timeout=1, touch=lambda: False) is WaitResult.LIFTED


def test_enroll_helper_and_threads_share_the_driver(sim, fp) -> None:
    sim.auto_present = True
    sim.auto_hold_s = sim.auto_gap_s = 0.1 / sim.time_scale
    sim.set_auto_finger("erin", 2)
    assert fp.enroll(3, timeout=5, poll_s=0.02) is WaitResult.CAPTURED
    assert fp.used_slots() == [3]
    sim.auto_present = False
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(10):
                assert fp.template_count() == 1
                assert fp.read_system_parameters().capacity == 1000
        except BaseException as e:  # noqa: BLE001 - collected for the main thread
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


def test_password_protected_module_and_nondefault_address(make_sim, make_fp) -> None:
    sim = make_sim("r307", password=0x1234, address=0xC0FFEE00)
    with pytest.raises(p.SensorTimeout):  # wrong address: the module stays silent
        make_fp(sim.port, baud_candidates=(57600,), password=0x1234)
    with pytest.raises(p.PasswordError, match="wrong password"):
        make_fp(sim.port, address=0xC0FFEE00, password=1)
    fp = make_fp(sim.port, address=0xC0FFEE00, password=0x1234)
    assert fp.params.password_verified and fp.params.address == 0xC0FFEE00
    # the module reboots and forgets the verification: the driver verifies again by itself
    sim.power_cycle()
    sim.set_sensor_baud(fp.baud)
    time.sleep(0.05)
    assert fp.template_count() == 0


def test_auto_baud_finds_the_module_and_raises_the_link(make_sim, make_fp) -> None:
    sim = make_sim("r307", baud=19200)
    fp = make_fp(sim.port, baud=57600)
    assert fp.baud == 115200 and sim.sensor_baud == 115200
    assert sim.host_baud() == 115200
    assert sim.stats.garbled_bytes > 0  # the 57600 probe really was garbled


def test_baud_change_that_needs_a_power_cycle_falls_back(make_sim, make_fp) -> None:
    sim = make_sim("r307", baud_apply="power_cycle")
    fp = make_fp(sim.port)
    assert fp.baud == 57600 and sim.sensor_baud == 57600  # fell back, still talking
    assert fp.template_count() == 0
    sim.power_cycle()  # now the module comes up at 115200; the driver must find it
    for _ in range(3):
        try:
            assert fp.template_count() == 0
            break
        except p.SensorTimeout:
            continue
    assert fp.baud == 115200


def test_bad_arguments_are_rejected_at_the_edge(fp) -> None:
    with pytest.raises(ValueError, match="char buffer"):
        fp.image_to_template(7)
    with pytest.raises(ValueError, match="page"):
        fp.store(70000)
    with pytest.raises(ValueError, match="security level"):
        fp.set_security_level(9)
    with pytest.raises(ValueError, match="packet size"):
        fp.set_packet_size(100)
    with pytest.raises(ValueError, match="baud"):
        fp.set_baud(12345)
    with pytest.raises(ValueError, match="template"):
        fp.download_template(b"")
    with pytest.raises(ValueError, match="no known sensor geometry"):
        fp.download_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="2-D uint8"):
        fp.download_image(np.zeros((288, 256), np.float64))


def test_pack_matches_what_the_sensor_sends(sim, fp) -> None:
    img = _pattern((288, 256))
    sim.present_image(img)
    fp.capture_image()
    assert pack_4bit(fp.upload_image()) == pack_4bit(img)


def test_from_config_builds_driver_and_simulator(bank, corpus_dir) -> None:
    from firmware import config
    from hw.sensor.driver import FingerprintSensor
    from hw.sensor.simulator import SensorSimulator

    cfg = config.defaults(sensor={"profile": "r503", "password": 7, "security_level": 5, "target_baud": 0})
    with SensorSimulator.from_config(cfg.sensor, corpus_dir, bank=bank, wire_speed=0, time_scale=0.02) as sim:
        assert sim.profile.name == "r503" and sim.password == 7
        fp = FingerprintSensor.from_config(cfg.sensor, port=sim.port, settle_s=0.02)
        try:
            params = fp.open()
            assert params.security_level == 5 and sim.security == 5  # written at start-up
            assert fp.baud == 57600  # target_baud 0: keep the found rate
        finally:
            fp.close()


def test_notepad_random_and_address_change(sim, fp) -> None:
    fp.write_notepad(3, b"kit-0042")
    assert fp.read_notepad(3) == b"kit-0042".ljust(32, b"\0")
    with pytest.raises(ValueError, match="notepad page"):
        fp.read_notepad(16)
    assert len({fp.random_number() for _ in range(5)}) > 1
    fp.set_address(0x0000ABCD)
    assert sim.address == 0x0000ABCD and fp.read_system_parameters().address == 0x0000ABCD


def test_r503_image_quality_check_and_sensor_check(make_sim, make_fp) -> None:
    sim = make_sim("r503")
    fp = make_fp(sim.port)
    assert fp.check_sensor()
    sim.present_finger("mona", 2)
    assert fp.capture_image(quality_check=True)
    blank = np.full((192, 192), 255, np.uint8)
    sim.present_image(blank)
    assert fp.capture_image() is True  # plain GenImg: "finger detected" even for a useless image
    with pytest.raises(p.ImageQualityError):
        fp.capture_image(quality_check=True)


def test_same_finger_matches_across_visits_and_flash_persists(make_sim, make_fp, tmp_path) -> None:
    """Enrol on one run of the simulator; a later run (new process state, same flash file) finds it."""
    flash = tmp_path / "flash.json"
    sim = make_sim("r307", library_path=flash, seed=1)
    fp = make_fp(sim.port)
    for buf in (1, 2):
        sim.present_finger("3201012345670001", 7)
        fp.capture_image()
        fp.image_to_template(buf)
    fp.create_model()
    fp.store(42)
    fp.close()
    sim.stop()
    sim2 = make_sim("r307", library_path=flash, seed=99)  # the next visit: other impression noise
    assert sim2.sensor_baud == 115200  # the raised baud was written to the module's flash
    fp2 = make_fp(sim2.port)
    assert fp2.used_slots() == [42]
    sim2.present_finger("3201012345670001", 7, "dry")
    fp2.capture_image()
    fp2.image_to_template(1)
    hit = fp2.search()
    assert hit is not None and hit.page == 42
    sim2.present_finger("3201012345670001", 6)  # another finger of the same resident
    fp2.capture_image()
    fp2.image_to_template(1)
    assert fp2.search() is None
