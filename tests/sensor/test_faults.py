"""Each fault knob: the driver recovers, or raises its typed error within its deadline; never hangs."""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hw.sensor import protocol as p
from hw.sensor.driver import WaitResult
from hw.sensor.image import R307_GEOMETRY, R503_GEOMETRY, Geometry
from hw.sensor.simulator import image_quality
from tests.support import wait_for

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __enter__(self) -> Clock:
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.monotonic() - self.t0


def test_corrupt_checksum_is_detected_and_the_command_resent(sim, fp) -> None:
    rejected = fp.link.framer.rejected
    sim.faults.corrupt_checksum_next = 1
    with Clock() as c:
        assert fp.template_count() == 0
    assert fp.link.framer.rejected > rejected  # the bad frame was seen and refused
    assert c.s < 0.5  # given up early (damaged reply), not after the deadline


def test_dropped_bytes_cost_one_deadline_then_recover(sim, fp) -> None:
    sim.faults.drop_bytes_next = 1
    with Clock() as c:
        assert fp.read_system_parameters().capacity == 1000
    assert c.s < 2.0


def test_stray_bytes_before_a_reply_are_skipped(sim, fp) -> None:
    sim.faults.stray_bytes_next = 3
    sim.faults.stray_payload = b"\x55\x00\xef\xef\x01\xff"
    for _ in range(3):
        assert fp.template_count() == 0
    assert fp.link.framer.discarded >= 18


def test_duplicate_ack_does_not_shift_later_replies(sim, fp) -> None:
    sim.faults.duplicate_ack_next = 1
    assert fp.template_count() == 0
    params = fp.read_system_parameters()  # must not be answered by the duplicate TemplateNum ACK
    assert params.capacity == 1000


def test_short_error_ack_raises_typed_error_and_keeps_step(sim, fp) -> None:
    sim.faults.error_ack_next = 1
    with pytest.raises(p.PacketReceiveError, match="MATCH"):
        fp.match()  # a 3-length ACK where 5 bytes are normal
    assert fp.template_count() == 0


def test_one_lost_reply_is_resent(sim, fp) -> None:
    sim.faults.no_reply_next = 1
    with Clock() as c:
        assert fp.template_count() == 0
    assert 0.4 < c.s < 2.0


def test_dead_sensor_times_out_within_deadline_then_comes_back(sim, fp) -> None:
    sim.faults.dead = True
    with Clock() as c, pytest.raises(p.SensorTimeout, match="TEMPLATE_NUM"):
        fp.template_count()
    assert c.s < 2.5  # 2 attempts x 0.5 s processing allowance + wire time
    with Clock() as c, pytest.raises(p.SensorTimeout):
        fp.capture_image()
    assert c.s < 4.0
    sim.faults.dead = False
    assert fp.template_count() == 0  # re-synchronised (auto-baud) on the next call


def test_slow_reply_within_allowance_and_too_slow(sim, fp) -> None:
    sim.faults.reply_delay_s = 0.25
    assert fp.template_count() == 0
    sim.faults.reply_delay_s = 3.0
    with Clock() as c, pytest.raises(p.SensorTimeout):
        fp.template_count()
    assert c.s < 2.5
    sim.faults.reply_delay_s = 0.0
    time.sleep(3.2)  # let the late replies drain; the next command flushes them
    assert fp.template_count() == 0


def test_busy_after_parameter_change(make_sim, make_fp) -> None:
    sim = make_sim("r307", time_scale=1.0)
    sim.faults.busy_after_set_s = 0.6
    fp = make_fp(sim.port, target_baud=None, settle_s=0.1)
    fp.set_security_level(5)
    assert fp.params.security_level == 5
    assert fp.template_count() == 0


def test_baud_mismatch_is_garbled_then_auto_baud_finds_it(sim, fp) -> None:
    sim.set_sensor_baud(38400)  # e.g. someone changed N and power-cycled the module
    with pytest.raises(p.SensorError):
        fp.template_count()
    assert sim.stats.garbled_bytes > 0
    assert fp.template_count() == 0  # re-synchronised: found at 38400, raised again
    assert fp.baud == 115200 and sim.sensor_baud == 115200


def test_finger_removed_mid_capture(sim, fp) -> None:
    sim.present_finger("frank", 4)
    sim.faults.capture_removed_next = 1
    with pytest.raises(p.CaptureFailed):
        fp.capture_image()
    assert not sim.finger_present
    sim.present_finger("frank", 4)
    sim.faults.capture_removed_next = 1
    # wait_for_finger treats 0x03 as "keep polling": the finger comes back and is captured
    threading.Timer(0.3, sim.present_finger, args=("frank", 4)).start()
    assert fp.wait_for_finger(timeout=3, poll_s=0.02) is WaitResult.CAPTURED
    assert sim.stats.captures >= 1


def test_library_full_and_flash_failure(sim, fp) -> None:
    sim.present_finger("gina", 0)
    fp.capture_image()
    fp.image_to_template(1)
    sim.faults.library_full = True
    with pytest.raises(p.LibraryFull):
        fp.store(0)
    sim.faults.library_full = False
    sim.faults.flash_fail_next = 1
    with pytest.raises(p.FlashError, match="flash"):
        fp.store(0)
    fp.store(0)
    assert fp.used_slots() == [0]


def test_damaged_data_packet_in_image_upload_is_retried(sim, fp) -> None:
    img = ((np.indices((288, 256)).sum(axis=0) % 16) * 17).astype(np.uint8)
    sim.present_image(img)
    fp.capture_image()
    sim.faults.corrupt_data_next = 1
    assert np.array_equal(fp.upload_image(), img)
    fp.bulk_retries = 0
    sim.faults.corrupt_data_next = 1
    with pytest.raises(p.UnexpectedReply, match="lost in transit"):
        fp.upload_image()
    assert np.array_equal(fp.upload_image(), img)


def test_gap_in_bulk_transfer_times_out(sim, fp) -> None:
    sim.present_finger("hugo", 1)
    fp.capture_image()
    fp.image_to_template(1)
    sim.faults.bulk_gap_s = 0.7  # > BULK_GAP_S between data packets
    fp.bulk_retries = 0
    with Clock() as c, pytest.raises(p.SensorTimeout, match="UpChar data packet"):
        fp.upload_template(1)
    assert c.s < 2.0
    sim.faults.bulk_gap_s = 0.0

    def answers() -> bool:
        try:
            assert len(fp.upload_template(1)) == 512
            return True
        except p.SensorError:
            return False

    wait_for(answers, 5, "the module to finish its slow transfer and answer again", step=0)


@pytest.mark.parametrize("quality", ["dry", "wet", "partial"])
def test_skin_conditions_change_the_image(bank, quality: str) -> None:
    from hw.sensor.image import R307_GEOMETRY

    rng = np.random.default_rng(5)
    good = [bank.impression("ivan/2", R307_GEOMETRY, "good", rng).image for _ in range(3)]
    bad = [bank.impression("ivan/2", R307_GEOMETRY, quality, rng).image for _ in range(3)]
    g_mean = np.mean([im.mean() for im in good])
    b_mean = np.mean([im.mean() for im in bad])
    g_frac = np.mean([image_quality(im)[0] for im in good])
    b_frac = np.mean([image_quality(im)[0] for im in bad])
    if quality == "dry":
        assert b_mean > g_mean + 10  # lighter, broken ridges
    elif quality == "wet":
        assert b_mean < g_mean - 10  # darker, merged ridges
    else:
        assert b_frac < g_frac - 0.2  # much less of the finger on the glass


def test_poor_images_fail_feature_extraction_more_often(sim, fp) -> None:
    def failures(quality: str) -> int:
        n = 0
        for i in range(6):
            sim.present_finger(f"judy{i}", i, quality)
            fp.capture_image()
            try:
                fp.image_to_template(1)
            except p.ImageQualityError:
                n += 1
        return n

    assert failures("good") == 0
    assert failures("partial") >= 1


def test_unplugged_port_raises_unavailable_then_reopens(make_sim, make_fp, tmp_path: Path) -> None:
    link = tmp_path / "fp"
    sim = make_sim("r307", link=link)
    fp = make_fp(str(link))
    assert fp.template_count() == 0
    sim.unplug()
    with Clock() as c, pytest.raises(p.SensorUnavailable):
        fp.template_count()
    assert c.s < 1.0
    with pytest.raises(p.SensorUnavailable, match="cannot open|next reopen"):
        fp.template_count()  # port gone: clear error, no hang
    sim.replug()
    time.sleep(0.25)  # past the reopen backoff

    def reopened() -> bool:
        try:
            assert fp.template_count() == 0
            return True
        except p.SensorUnavailable:
            return False

    wait_for(reopened, 5, "the driver to reopen the port", step=0.1)
    assert fp.is_open


def test_random_line_noise_only_ever_raises_typed_errors(sim, fp) -> None:
    """Seeded rounds of random garbage and damaged replies: every call ends in a result or a SensorError."""
    rng = np.random.default_rng(7)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(25):
        sim.faults.stray_bytes_next = 1
        sim.faults.stray_payload = rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8).tobytes()
        kind = int(rng.integers(0, 3))
        if kind == 0:
            sim.faults.corrupt_checksum_next = 1
        elif kind == 1:
            sim.faults.drop_bytes_next = 1
            sim.faults.drop_count = int(rng.integers(1, 6))
        try:
            assert fp.template_count() == 0
            outcomes["ok"] += 1
        except p.SensorError:
            outcomes["error"] += 1
    assert outcomes["ok"] >= 20  # resends recover almost every round
    assert fp.read_system_parameters().capacity == 1000


def test_duplicate_ack_before_bulk_data_is_not_taken_for_data(sim, fp) -> None:
    sim.present_finger("lena", 6)
    fp.capture_image()
    fp.image_to_template(1)
    tpl = fp.upload_template(1)
    sim.faults.duplicate_ack_next = 1
    fp.bulk_retries = 0
    assert fp.upload_template(1) == tpl


def test_late_reply_of_an_earlier_command_is_not_taken_for_this_one(sim, fp) -> None:
    """No sequence numbers in EF01: a stale ACK is recognised by a code or length this command never has."""
    img = ((np.indices((288, 256)).sum(axis=0) % 16) * 17).astype(np.uint8)
    sim.present_image(img)
    fp.capture_image()
    sim.faults.late_ack_next = 1
    sim.faults.late_ack_code = 0x02  # "no finger": a GenImg answer, impossible for UpImage
    assert np.array_equal(fp.upload_image(), img)
    sim.faults.late_ack_next = 1
    sim.faults.late_ack_code = 0x00  # a bare OK: too short for TemplateNum's count
    assert fp.template_count() == 0
    sim.faults.late_ack_next = 1
    sim.faults.late_ack_code = 0x09  # "not found" cannot answer ReadSysPara
    assert fp.read_system_parameters().capacity == 1000


def _pattern(g: Geometry) -> np.ndarray:
    return ((np.indices((g.height, g.width)).sum(axis=0) % 16) * 17).astype(np.uint8)


def test_prod_info_of_another_length_leaves_the_model_unknown_and_the_sensor_opens(
        make_sim, make_fp, caplog: pytest.LogCaptureFixture) -> None:
    # an R503 firmware that answers ReadProdInfo OK with 50 result bytes, not 46: before, open() raised
    # UnexpectedReply and every later transaction reran the start-up and failed the same way
    sim = make_sim("r503")
    sim.faults.prod_info_extra = b"\0" * 4
    caplog.set_level(logging.WARNING, "hw.sensor")
    fp = make_fp(sim.port)
    assert fp.product is None and fp.geometry is None and fp.params.capacity == 200 and not fp.link.needs_sync
    warned = [r for r in caplog.records if "product info" in r.getMessage()]
    assert len(warned) == 1 and "46 bytes, got 50" in warned[0].getMessage(), warned
    probes = sim.stats.by_instruction["READ_PROD_INFO"]
    assert fp.template_count() == 0 and fp.check_sensor()
    assert sim.stats.by_instruction["READ_PROD_INFO"] == probes  # the start-up is not rerun per transaction
    fp.link.needs_sync = True  # a re-check (as after a lost reply) probes again, without a second warning
    assert fp.template_count() == 0
    assert sim.stats.by_instruction["READ_PROD_INFO"] == probes + 1
    assert len([r for r in caplog.records if "product info" in r.getMessage()]) == 1
    img = _pattern(R503_GEOMETRY)
    sim.present_image(img)
    assert fp.capture_image()
    assert np.array_equal(fp.upload_image(), img) and fp.geometry == R503_GEOMETRY  # learned from the image


def test_a_wrong_geometry_from_prod_info_gives_way_to_the_image(make_sim, make_fp,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # ReadProdInfo says 256x288, the module sends 192x192 images: before, every image was refused
    sim = make_sim("r503")
    sim.faults.prod_info_geometry = (256, 288)
    fp = make_fp(sim.port)
    assert fp.product is not None and fp.product.model == "R503" and fp.geometry == R307_GEOMETRY  # a hint
    caplog.set_level(logging.WARNING, "hw.sensor")
    img = _pattern(R503_GEOMETRY)
    sim.present_image(img)
    assert fp.capture_image()
    assert np.array_equal(fp.upload_image(), img) and fp.geometry == R503_GEOMETRY
    assert [r.getMessage() for r in caplog.records if "does not match" in r.getMessage()] == [
        "sensor image size does not match the geometry believed geometry=256x288 image=192x192 (ReadProdInfo "
        "or an earlier image); using the image's"]
    assert np.array_equal(fp.upload_image(), img)  # now bounded by the geometry the image showed
    fp.read_product_info()  # asking again does not bring the wrong geometry back
    assert fp.geometry == R503_GEOMETRY and np.array_equal(fp.upload_image(), img)


@pytest.mark.parametrize(("before", "after"), [(R307_GEOMETRY, R503_GEOMETRY), (R503_GEOMETRY, R307_GEOMETRY)])
def test_an_image_of_another_known_size_is_learned_again(make_sim, make_fp, before: Geometry,
                                                         after: Geometry) -> None:
    # the module's image size changes without the driver seeing an unplug (a swap on a GPIO UART between two
    # commands): the geometry of the earlier images is re-learned, not held against every image after
    sim = make_sim("r307")
    sim.profile = dataclasses.replace(sim.profile, geometry=before)
    fp = make_fp(sim.port)
    sim.present_image(_pattern(before))
    assert fp.capture_image() and fp.upload_image().shape == (before.height, before.width)
    sim.profile = dataclasses.replace(sim.profile, geometry=after)
    img = _pattern(after)
    sim.present_image(img)
    assert fp.capture_image()
    got = None
    for _ in range(2):  # the retry inside one call re-learns; a transfer cut short may cost the next call
        try:
            got = fp.upload_image()
            break
        except (p.UnexpectedReply, p.SensorTimeout):
            continue
    assert got is not None and np.array_equal(got, img) and fp.geometry == after
    assert np.array_equal(fp.upload_image(), img)


def test_a_flood_of_stale_replies_is_logged_as_a_count(sim, fp, caplog: pytest.LogCaptureFixture) -> None:
    # a noisy line made ~480 WARNING lines/s (one per stale frame): now the first one, then a count per window
    fp.link.stale_log_interval_s = 0.3
    caplog.set_level(logging.WARNING, "hw.sensor.link")
    sim.faults.late_ack_code = 0x00  # a bare OK: too short for TemplateNum, so skipped as stale
    sim.faults.late_ack_next = 100
    t0 = time.monotonic()
    for _ in range(100):
        assert fp.template_count() == 0
    took = time.monotonic() - t0
    time.sleep(0.35)
    assert fp.template_count() == 0  # the next reply after the window reports what was still counted
    msgs = [r.getMessage() for r in caplog.records if r.name == "hw.sensor.link"]
    full = [m for m in msgs if m.startswith("skipping a reply that is not for this command command=TEMPLATE_NUM")]
    counts = [int(m_.group(1)) for m in msgs if (m_ := re.search(r"^skipped stale replies count=(\d+) window_s=", m))]
    print(f"{len(msgs)} lines for 100 stale replies in {took:.2f} s")
    assert len(msgs) <= 3 + 2 * took / 0.3, msgs[:5]  # before: 100 lines
    assert len(full) + len(counts) == len(msgs), msgs
    assert len(full) + sum(counts) == 100 == fp.link.stale_skipped  # every one accounted for
