"""Plain records the simulator's device and command handlers share: what lies on the glass, counters."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Finger:
    """What lies on the glass: a finger (bank key, skin condition) or a fixed image."""

    key: str
    quality: str
    image: np.ndarray | None = None  # a fixed image (present_image)


@dataclass
class SimStats:
    """Counters a test or demo can look at."""

    commands: int = 0
    replies: int = 0
    bad_frames: int = 0
    garbled_bytes: int = 0
    dropped_output: int = 0
    captures: int = 0
    by_instruction: dict[str, int] = field(default_factory=dict)
    conditions: dict[str, int] = field(default_factory=dict)  # placements per condition (good, dry, ...)
