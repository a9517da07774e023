"""Writes the NMEA logs of tests/field/data (u-blox style talker GP, one sentence set per second).

Run once: `python -m tests.field.make_nmea`; the logs are committed, this says how they were made.
fix.nmea: a 3D fix all along (Bandung, 8 satellites, HDOP 0.9). nofix.nmea: a receiver that never gets one
(RMC status V, GGA quality 0). lost.nmea: a fix for 20 s, then 10 s without (a bus shelter roof: GGA quality 0).
"""

from __future__ import annotations

from functools import reduce
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
LAT, LON = (6, 54.882, "S"), (107, 36.588, "E")  # -6.91470, 107.60980
SATS = [(2, 45, 120, 41), (5, 60, 200, 43), (12, 30, 40, 38), (15, 25, 310, 36), (18, 70, 90, 44),
        (21, 15, 250, 33), (25, 50, 160, 40), (29, 35, 10, 37)]


def sentence(body: str) -> str:
    return f"${body}*{reduce(lambda a, c: a ^ ord(c), body, 0):02X}\r\n"


def cycle(t: int, fix: bool) -> str:
    hh, mm, ss = 3, t // 60, t % 60
    hms = f"{hh:02d}{mm:02d}{ss:02d}.00"
    lat = f"{LAT[0]:02d}{LAT[1]:07.4f},{LAT[2]}" if fix else ","
    lon = f"{LON[0]:03d}{LON[1]:07.4f},{LON[2]}" if fix else ","
    out = sentence(f"GPRMC,{hms},{'A' if fix else 'V'},{lat},{lon},0.02,,011226,,,{'A' if fix else 'N'}")
    out += sentence(f"GPGGA,{hms},{lat},{lon},{1 if fix else 0},{8 if fix else 0:02d},"
                    f"{'0.9' if fix else ''},{'712.4,M,6.1,M' if fix else ',,,'},,")
    used = ",".join(f"{p:02d}" for p, *_ in SATS) if fix else ",,,,,,,"
    out += sentence(f"GPGSA,A,{3 if fix else 1},{used},,,,,{'1.6,0.9,1.3' if fix else ',,'}")
    for i in range(0, len(SATS), 4):
        group = ",".join(f"{p:02d},{e:02d},{a:03d},{s if fix else ''}" for p, e, a, s in SATS[i:i + 4])
        out += sentence(f"GPGSV,2,{i // 4 + 1},{len(SATS):02d},{group}")
    return out


def main() -> None:
    DATA.mkdir(exist_ok=True)
    (DATA / "fix.nmea").write_text("".join(cycle(t, True) for t in range(60)), newline="")
    (DATA / "nofix.nmea").write_text("".join(cycle(t, False) for t in range(60)), newline="")
    (DATA / "lost.nmea").write_text("".join(cycle(t, t < 20) for t in range(30)), newline="")


if __name__ == "__main__":
    main()
