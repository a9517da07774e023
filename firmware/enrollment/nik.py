"""Validation of the resident's NIK (Nomor Induk Kependudukan), 16 digits.

    PP KK CC DDMMYY SSSS
    |  |  |  |      serial, 0001-9999
    |  |  |  date of birth; women: day + 40
    |  |  district (kecamatan), non-zero
    |  regency/city (kabupaten/kota), non-zero
    province, from the Kemendagri list

Each failure has its own code and message, so the operator knows what to correct.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from firmware.errors import NikError
from firmware.system.i18n import gettext

# Kemendagri province codes, including the Papua provinces created in 2022 (91-96).
PROVINCES: dict[str, str] = {
    "11": "Aceh", "12": "Sumatera Utara", "13": "Sumatera Barat", "14": "Riau", "15": "Jambi",
    "16": "Sumatera Selatan", "17": "Bengkulu", "18": "Lampung", "19": "Kepulauan Bangka Belitung",
    "21": "Kepulauan Riau", "31": "DKI Jakarta", "32": "Jawa Barat", "33": "Jawa Tengah", "34": "DI Yogyakarta",
    "35": "Jawa Timur", "36": "Banten", "51": "Bali", "52": "Nusa Tenggara Barat", "53": "Nusa Tenggara Timur",
    "61": "Kalimantan Barat", "62": "Kalimantan Tengah", "63": "Kalimantan Selatan", "64": "Kalimantan Timur",
    "65": "Kalimantan Utara", "71": "Sulawesi Utara", "72": "Sulawesi Tengah", "73": "Sulawesi Selatan",
    "74": "Sulawesi Tenggara", "75": "Gorontalo", "76": "Sulawesi Barat", "81": "Maluku", "82": "Maluku Utara",
    "91": "Papua", "92": "Papua Barat", "93": "Papua Selatan", "94": "Papua Tengah", "95": "Papua Pegunungan",
    "96": "Papua Barat Daya",
}


@dataclass(frozen=True)
class Nik:
    """A structurally valid NIK, decoded."""

    value: str
    province: str
    regency: str
    district: str
    birth_date: dt.date
    female: bool
    serial: str


def parse(text: str, today: dt.date | None = None) -> Nik:
    """Validate and decode a NIK; raise `NikError` with the first problem found."""
    s = text.strip().replace(" ", "").replace(".", "")
    if not s.isascii() or not s.isdigit():
        raise NikError("not_digits", gettext("NIK must contain only digits 0-9"))
    if len(s) != 16:
        raise NikError("length", gettext("NIK must have 16 digits, this one has {n}", n=len(s)))
    prov, reg, dist = s[0:2], s[2:4], s[4:6]
    if prov not in PROVINCES:
        raise NikError("province", gettext("province code {code} (digits 1-2) is not an Indonesian province",
                                             code=prov))
    if reg == "00":
        raise NikError("regency", gettext("regency/city code (digits 3-4) must not be 00"))
    if dist == "00":
        raise NikError("district", gettext("district code (digits 5-6) must not be 00"))
    day, month, yy = int(s[6:8]), int(s[8:10]), int(s[10:12])
    female = day > 40
    if female:
        day -= 40
    today = today or dt.date.today()
    # Two-digit year: the most recent year not in the future.
    year = 2000 + yy if 2000 + yy <= today.year else 1900 + yy
    try:
        born = dt.date(year, month, day)
    except ValueError:
        raise NikError("birth_date", gettext("date of birth in digits 7-12 ({digits}) is not a real date",
                                             digits=s[6:12])
                       + (" " + gettext("(women: day + 40)") if not female and day > 31 else "")) from None
    if born > today:
        raise NikError("birth_date", gettext("date of birth {date} is in the future", date=born.isoformat()))
    if s[12:16] == "0000":
        raise NikError("serial", gettext("serial number (digits 13-16) must not be 0000"))
    return Nik(s, prov, reg, dist, born, female, s[12:16])
