"""The simulator's finger bank: masters shared between processes through a disk cache."""

from __future__ import annotations

import numpy as np


def test_masters_are_shared_through_the_disk_cache_and_a_torn_file_is_grown_again(tmp_path) -> None:
    """A master grown by one process is read by the next (a test session's daemons grow each resident's fingers
    once); it is the same array; a torn or foreign file is grown again, never used."""
    from hw.sensor.synth import FingerBank, grow_master

    a = FingerBank(disk_cache=tmp_path)
    m = a.master("3201011505900001:1")
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and np.array_equal(np.load(files[0]), m)
    b = FingerBank(disk_cache=tmp_path)
    assert np.array_equal(b.master("3201011505900001:1"), grow_master("3201011505900001:1"))
    files[0].write_bytes(files[0].read_bytes()[:100])  # torn
    c = FingerBank(disk_cache=tmp_path)
    assert np.array_equal(c.master("3201011505900001:1"), m)
    assert np.array_equal(np.load(files[0]), m)  # and written whole again
    assert FingerBank(disk_cache="").disk_cache is None  # "" = off (the environment's default aside)
