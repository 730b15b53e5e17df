"""JPEG stream helpers: the marker-segment walk and the first image of an MPO file.

* MPO (CIPA DC-007, "multi-picture" JPEG from cameras and phones: stereo pairs, large previews, gain maps)
  is a baseline JPEG followed by more JPEGs, with an APP2 ``MPF`` segment pointing at them. Its first image,
  cut at its own EOI and without that APP2 segment, is a plain JPEG whose entropy-coded data are the file's
  own bytes: PIL, OpenCV and DALI's CPU decoder give the same pixels for it as for the MPO file (checked by
  a test), so the packer stores it instead of a re-encoding.
"""
from __future__ import annotations

from typing import Iterator, Tuple

_SOI, _EOI, _SOS, _APP2 = 0xD8, 0xD9, 0xDA, 0xE2
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7 carry no length


def segments(data: bytes) -> Iterator[Tuple[int, int, int]]:
    """``(marker, start, end)`` of each segment of the first JPEG image in ``data``, from SOI to EOI.

    Entropy-coded data after an SOS belong to the SOS segment. Raises ValueError on a malformed stream.
    """
    if data[:2] != b"\xff\xd8":
        raise ValueError("no JPEG start-of-image marker")
    yield _SOI, 0, 2
    pos, n = 2, len(data)
    while pos < n:
        if data[pos] != 0xFF:
            raise ValueError(f"expected a marker at byte {pos}")
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= n:
            break
        marker = data[pos + 1]
        if marker == _EOI:
            yield marker, pos, pos + 2
            return
        if marker in _STANDALONE:
            yield marker, pos, pos + 2
            pos += 2
            continue
        if pos + 4 > n:
            break
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == _SOS:
            end = _entropy_end(data, end)
        if end > n:
            break
        yield marker, pos, end
        pos = end
    raise ValueError("the stream ends before its end-of-image marker")


def _entropy_end(data: bytes, pos: int) -> int:
    """Offset of the first marker after entropy-coded data starting at ``pos`` (0xFF00 and RSTn are data)."""
    while True:
        j = data.find(b"\xff", pos)
        if j < 0 or j + 1 >= len(data):
            return len(data) + 1
        nxt = data[j + 1]
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
            pos = j + 1
            continue
        return j


def mpo_first_image(data: bytes) -> bytes:
    """The first image of an MPO file as a plain JPEG: SOI..EOI, minus the APP2 ``MPF`` segment(s)."""
    out = bytearray()
    for marker, start, end in segments(data):
        if marker == _APP2 and data[start + 4:start + 8] == b"MPF\0":
            continue
        out += data[start:end]
    return bytes(out)
