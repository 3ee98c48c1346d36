"""Sizes written with units: `2GiB`, `512MiB`, `500MB`, or a bare number of bytes."""

from __future__ import annotations

import re

LARGEST_SIZE = 2**60
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int, key: str = "budget") -> int:
    """'2GiB' -> 2147483648; '500MB' -> 500000000; a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]{0,30}\.?[0-9]{1,30})\s*([A-Za-z]*)\s*", str(text)[:100])
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{key}={str(text)[:40]!r} is not a size (e.g. 2GiB, 512MiB, 500MB, or bytes)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size > LARGEST_SIZE:
        raise ValueError(f"{key}={text!r} is more than {LARGEST_SIZE} bytes (1 EiB); no machine holds that")
    return size
