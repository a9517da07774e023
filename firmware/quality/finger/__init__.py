"""On-device fingerprint quality: NFIQ 2-style features, hard rejects with operator feedback,
and a small model that predicts the NFIQ 2 score on the kit's sensor images.

Public API (see `firmware.quality.finger.quality.assess`): ``assess(image) -> FingerQuality``.
"""
