"""Camera backends: the sim for real, OpenCV through a real VideoCapture on a generated video file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from hw.camera import CameraError, open_camera
from hw.camera.base import to_bgr
from hw.camera.opencv_backend import OpenCVCamera
from hw.camera.picamera2_backend import ae_settled
from hw.camera.sim import SimCamera, clear_portraits


def test_sim_cycles_the_clear_portraits_by_default(faces_dir: Path) -> None:
    names = [p.name for p in clear_portraits(faces_dir)]
    assert names == ["facerec-biden2.jpg", "facerec-obama.jpg"]
    with SimCamera(faces_dir) as cam:
        shots = [cam.capture() for _ in range(3)]
        assert shots[0].shape == (1200, 1200, 3) and shots[1].shape == (1137, 910, 3)
        assert np.array_equal(shots[0], shots[2])
        assert cam.health()["frames"] == 3
    with pytest.raises(CameraError, match="capture after close"):
        cam.capture()


def test_sim_serves_queued_paths_and_arrays_first(faces_dir: Path) -> None:
    cam = SimCamera(faces_dir)
    arr = np.full((48, 64), 77, np.uint8)  # gray is expanded to BGR
    cam.serve("nbisrs-landscape.jpg", arr, faces_dir / "facerec-two_people.jpg")
    assert cam.pending() == 3
    assert cam.capture().shape == (420, 650, 3)
    a = cam.capture()
    assert a.shape == (48, 64, 3) and (a == 77).all()
    assert cam.capture().shape == (661, 1126, 3)
    assert cam.capture().shape == (1200, 1200, 3)  # queue empty: back to the cycle
    with pytest.raises(CameraError, match="no such image"):
        cam.serve("does-not-exist.jpg")


def test_sim_any_folder_and_bad_folders(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((10, 20, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    assert SimCamera(tmp_path).capture().shape == (10, 20, 3)
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    cam = SimCamera(tmp_path, files=["b.jpg"])
    with pytest.raises(CameraError, match="cannot read image"):
        cam.capture()
    assert cam.health()["errors"] == 1
    with pytest.raises(CameraError, match="folder not found"):
        SimCamera(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CameraError, match="no images"):
        SimCamera(empty)


def _numbered_video(path: Path, n: int, size: tuple[int, int] = (320, 240)) -> None:
    """n frames whose gray level encodes their index (MJPG keeps flat areas within a few levels)."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, size)
    assert w.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for i in range(n):
        w.write(np.full((size[1], size[0], 3), 20 + 20 * i, np.uint8))
    w.release()


def test_opencv_backend_on_a_real_video_stream(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    _numbered_video(video, 8)
    with OpenCVCamera(video, warmup_frames=2) as cam:
        assert cam.health()["size"] == [320, 240]
        first = cam.capture()  # frames 0 and 1 dropped for exposure settling: frame 2
        assert first.shape == (240, 320, 3) and first.dtype == np.uint8
        assert abs(int(np.median(first)) - (20 + 20 * 2)) <= 3
        second = cam.capture()  # frames 3, 4 dropped: frame 5
        assert abs(int(np.median(second)) - (20 + 20 * 5)) <= 3
        with pytest.raises(CameraError, match="read failed"):
            cam.capture()  # frames 6, 7 dropped, then the stream ends
        assert cam.health()["errors"] == 1 and cam.health()["frames"] == 2


def test_opencv_backend_refuses_what_it_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="cannot open"):
        OpenCVCamera(tmp_path / "nothing.avi")
    if not Path("/dev/video63").exists():
        with pytest.raises(CameraError, match=r"cannot open /dev/video63"):
            OpenCVCamera(63)


@pytest.mark.skipif(not Path("/dev/video0").exists(), reason="no V4L2 device on this machine")
def test_opencv_backend_on_a_real_webcam() -> None:
    with OpenCVCamera(0, 640, 480) as cam:
        frame = cam.capture()
    assert frame.ndim == 3 and frame.shape[2] == 3


def test_frame_normalisation_rejects_bad_frames() -> None:
    assert to_bgr(np.zeros((4, 5, 4), np.uint8), "t").shape == (4, 5, 3)
    for bad, why in [(None, "no frame"), (np.zeros((0, 5, 3), np.uint8), "empty"),
                     (np.zeros((4, 5, 3), np.uint16), "dtype"), (np.zeros((4, 5, 2), np.uint8), "shape")]:
        with pytest.raises(CameraError, match=why):
            to_bgr(bad, "t")


def test_open_camera_from_config_section(faces_dir: Path) -> None:
    from firmware import config

    cfg = config.defaults(camera={"backend": "sim", "sim_folder": str(faces_dir)})
    with open_camera(cfg.camera) as cam:
        assert cam.name == "sim" and cam.capture().ndim == 3
    with pytest.raises(CameraError, match="no folder"):
        open_camera({"backend": "sim"})
    with pytest.raises(CameraError, match="must be one of"):
        open_camera({"backend": "gopro"})
    with pytest.raises(config.ConfigError, match="camera.backend"):
        config.defaults(camera={"backend": "gopro"})


@pytest.mark.skipif(importlib.util.find_spec("picamera2") is not None, reason="picamera2 present (a Pi)")
def test_picamera2_backend_says_what_is_missing_off_a_pi() -> None:
    with pytest.raises(CameraError, match="python3-picamera2"):
        open_camera({"backend": "picamera2"})


def test_auto_exposure_settled_from_libcamera_metadata() -> None:
    assert ae_settled({"AeLocked": True}) and not ae_settled({"AeLocked": False})
    assert ae_settled({"AeState": 2}) and not ae_settled({"AeState": 1})
    assert not ae_settled({"AeState": 1, "AeLocked": True})  # newer libcamera: AeState wins
    assert not ae_settled({})
