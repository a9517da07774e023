"""Issue #13 finding 10: a hostile or broken module cannot keep a bulk transfer (UpImage/UpChar) going.

Real simulator on a real pty, real driver through pyserial. The simulator's hostile knobs trickle the
upload as 1-byte DATA packets (each well inside the gap allowed between two packets) or stream ACK
frames in the data phase; before the fix both ran for hours (36,864 packets x 0.4 s for an image).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from hw.sensor import protocol as p
from hw.sensor.image import GEOMETRIES
from hw.sensor.link import BULK_GAP_S, MAX_BULK_STRAY, UPCHAR_BUDGET_BYTES
from tests.support import wait_for

pytestmark = pytest.mark.timeout(60)


def _after_hostile(sim, fp, check) -> None:
    """Clear the hostile knobs, let the simulator finish its send, and check the link works again."""
    sim.faults.bulk_trickle_s = sim.faults.bulk_ack_flood_s = 0.0
    wait_for(lambda: _works(check), 15, "the sensor to answer normally again")


def _works(check) -> bool:
    try:
        check()
        return True
    except (p.SensorTimeout, p.UnexpectedReply):
        return False


def test_trickled_one_byte_packets_end_upchar_within_its_deadline(sim, fp) -> None:
    sim.present_finger("hugo", 1)
    fp.capture_image()
    fp.image_to_template(1)
    normal = fp.upload_template(1)
    fp.bulk_retries = 0
    limit = fp.link.bulk_deadline_s(UPCHAR_BUDGET_BYTES, fp.params.packet_size)
    sim.faults.bulk_trickle_s = BULK_GAP_S * 0.8  # every packet just inside the gap: the gap timer never fires
    t0 = time.monotonic()
    with pytest.raises(p.SensorTimeout, match="transfer not finished"):
        fp.upload_template(1)
    took = time.monotonic() - t0
    print(f"UpChar trickle refused after {took:.2f} s (deadline {limit:.2f} s)")
    assert took < limit + 1.0
    _after_hostile(sim, fp, lambda: fp.upload_template(1))
    assert fp.upload_template(1) == normal  # normal transfers unchanged


def test_trickled_one_byte_packets_end_upimage_within_its_deadline(make_sim, make_fp) -> None:
    sim = make_sim("r503")
    fp = make_fp(sim.port)
    assert fp.set_baud(115200) == 115200  # a shorter wire time: the same rule, a faster test
    img = ((np.indices((192, 192)).sum(axis=0) % 16) * 17).astype(np.uint8)
    sim.present_image(img)
    fp.capture_image()
    assert np.array_equal(fp.upload_image(), img)
    fp.bulk_retries = 0
    limit = fp.link.bulk_deadline_s(fp.geometry.packed_bytes, fp.params.packet_size)
    assert limit < fp.link.bulk_deadline_s(max(g.packed_bytes for g in GEOMETRIES), 32)
    sim.faults.bulk_trickle_s = 0.05
    t0 = time.monotonic()
    with pytest.raises(p.SensorTimeout, match="transfer not finished"):
        fp.upload_image()
    took = time.monotonic() - t0
    print(f"UpImage trickle refused after {took:.2f} s (deadline {limit:.2f} s)")
    assert took < limit + 1.0
    _after_hostile(sim, fp, fp.upload_image)
    assert np.array_equal(fp.upload_image(), img)


def test_stream_of_acks_in_the_data_phase_is_refused(sim, fp) -> None:
    sim.present_finger("hugo", 1)
    fp.capture_image()
    fp.image_to_template(1)
    fp.bulk_retries = 0
    limit = fp.link.bulk_deadline_s(UPCHAR_BUDGET_BYTES, fp.params.packet_size)
    sim.faults.bulk_ack_flood_s = BULK_GAP_S * 0.5  # each ACK restarted the gap timer and counted toward nothing
    t0 = time.monotonic()
    # 9 ACKs at half the gap take about the whole deadline: on a loaded machine the deadline may come first.
    # Either refusal is the fix (before, the stream kept the transfer alive for ever); the bound is the point.
    with pytest.raises((p.UnexpectedReply, p.SensorTimeout), match="ACK frames inside the data|not finished within"):
        fp.upload_template(1)
    took = time.monotonic() - t0
    print(f"ACK flood refused after {took:.2f} s ({MAX_BULK_STRAY} tolerated, deadline {limit:.2f} s)")
    assert took < limit + 1.0
    _after_hostile(sim, fp, lambda: fp.upload_template(1))
    assert len(fp.upload_template(1)) == 512


def test_a_fast_ack_stream_is_refused_by_count_not_time(sim, fp) -> None:
    sim.present_finger("hugo", 1)
    fp.capture_image()
    fp.image_to_template(1)
    fp.bulk_retries = 0
    sim.faults.bulk_ack_flood_s = 0.01
    t0 = time.monotonic()
    with pytest.raises(p.UnexpectedReply, match="ACK frames inside the data"):
        fp.upload_template(1)
    assert time.monotonic() - t0 < 1.0
    _after_hostile(sim, fp, lambda: fp.upload_template(1))
