"""On-device face image quality: BlazeFace + FaceMesh + iris (TFLite via LiteRT) and ICAO/OFIQ measures.

Public entry points:

* `FaceAssessor` (``firmware.quality.face.assess``): ``assess(bgr) -> FaceAssessment``.
* `capture_face` (``firmware.quality.face.capture``): the retake loop over a camera.
* `make_portrait` (``firmware.quality.face.portrait``): the ICAO-proportioned crop.

Heavy imports (numpy, cv2, LiteRT) live in the submodules, never here.
"""
