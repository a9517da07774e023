"""On-device face image quality: BlazeFace + FaceMesh + iris (TFLite via LiteRT) and ICAO/OFIQ measures.

Public entry points:

* `FaceAssessor` (``firmware.facequality.assess``): ``assess(bgr) -> FaceAssessment``.
* `capture_face` (``firmware.facequality.capture``): the retake loop over a camera.
* `make_portrait` (``firmware.facequality.portrait``): the ICAO-proportioned crop.

Heavy imports (numpy, cv2, LiteRT) live in the submodules, never here.
"""
