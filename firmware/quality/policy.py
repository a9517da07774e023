"""The retake policy shared by fingerprint and face capture.

Up to `max_attempts` impressions; the first one at or above `threshold` (with no hard-reject
code) is accepted at once. Otherwise the best one is kept, and after the last attempt it is
accepted with ``forced=True`` so the operator can move on; every attempt's score and feedback
codes go into the record either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Attempt:
    """One impression or shot as judged by a quality check."""

    score: float
    codes: list[str] = field(default_factory=list)
    rejected: bool = False  # a hard reject (no finger, two faces...) never counts as acceptable
    data: Any = None  # the image, kept only for the best attempt by the caller if it wishes

    def summary(self) -> dict[str, Any]:
        """What goes into the record for this attempt (no image data)."""
        return {"score": round(float(self.score), 2), "codes": list(self.codes), "rejected": self.rejected}


@dataclass
class Outcome:
    """The policy's verdict after an attempt."""

    done: bool
    accepted: Attempt | None
    forced: bool
    attempts: list[Attempt]

    def summary(self) -> dict[str, Any]:
        """Scores of every attempt, which one was kept and whether acceptance was forced."""
        best = self.attempts.index(self.accepted) if self.accepted in self.attempts else None
        return {
            "attempts": [a.summary() for a in self.attempts],
            "kept": best,
            "forced": self.forced,
        }


class CapturePolicy:
    """Decide after each attempt whether to retake, accept, or accept the best with `forced`."""

    def __init__(self, threshold: float, max_attempts: int = 3) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.threshold = threshold
        self.max_attempts = max_attempts
        self.attempts: list[Attempt] = []

    def _best(self) -> Attempt | None:
        usable = [a for a in self.attempts if not a.rejected] or self.attempts
        return max(usable, key=lambda a: (not a.rejected, a.score)) if usable else None

    def add(self, attempt: Attempt) -> Outcome:
        """Record one attempt and return what to do next."""
        if len(self.attempts) >= self.max_attempts:
            raise RuntimeError("capture policy already finished")
        self.attempts.append(attempt)
        if not attempt.rejected and attempt.score >= self.threshold:
            return Outcome(True, attempt, False, list(self.attempts))
        if len(self.attempts) >= self.max_attempts:
            return Outcome(True, self._best(), True, list(self.attempts))
        return Outcome(False, None, False, list(self.attempts))


@dataclass
class CaptureState:
    """One body part's progress in an enrollment (a finger, an eye): its policy, the verdict so far, or the
    exception recorded instead (amputated, bandaged, prosthesis...)."""

    policy: CapturePolicy
    outcome: Outcome | None = field(default=None, kw_only=True)
    exception: str = field(default="", kw_only=True)

    @property
    def done(self) -> bool:
        """Captured (accepted, or the best kept after the last attempt) or excepted."""
        return bool(self.exception) or (self.outcome is not None and self.outcome.done)
