"""JPEG stream helpers: the marker-segment walk, the first image of an MPO file, and a quality estimate.

* MPO (CIPA DC-007, "multi-picture" JPEG from cameras and phones: stereo pairs, large previews, gain maps)
  is a baseline JPEG followed by more JPEGs, with an APP2 ``MPF`` segment pointing at them. Its first image,
  cut at its own EOI and without that APP2 segment, is a plain JPEG whose entropy-coded data are the file's
  own bytes: PIL, OpenCV and DALI's CPU decoder give the same pixels for it as for the MPO file (checked by
  a test), so the packer stores it instead of a re-encoding.
* Quality: the libjpeg/IJG encoder scales the standard tables of ITU-T T.81 Annex K by
  ``scale = 5000/q`` (q < 50) or ``200 - 2q`` and rounds, clamped to 1..255. ``estimate_quality`` inverts it
  (as ImageMagick's estimate does) by taking the q whose IJG tables are nearest (sum of absolute differences)
  to the file's tables. For encoders with their own tables (many cameras) it is an approximation; it is meant
  for comparing classes, not for judging one file.
"""
from __future__ import annotations

import functools
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

# ITU-T T.81 Annex K.1/K.2, natural (row-major) order, as PIL's ``Image.quantization`` returns them.
STD_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)
STD_CHROMINANCE = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99, *([99] * 32),
)
_SOI, _EOI, _SOS, _APP2 = 0xD8, 0xD9, 0xDA, 0xE2
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7 carry no length


def ijg_table(std: Sequence[int], quality: int) -> List[int]:
    """The table libjpeg writes for ``quality`` (1-100) from a standard table (``jpeg_add_quant_table``)."""
    q = min(100, max(1, quality))
    scale = 5000 // q if q < 50 else 200 - 2 * q
    return [min(255, max(1, (s * scale + 50) // 100)) for s in std]


_QUALITIES = np.arange(1, 101)
_LUM = np.array([ijg_table(STD_LUMINANCE, int(q)) for q in _QUALITIES], dtype=np.int64)
_CHROM = np.array([ijg_table(STD_CHROMINANCE, int(q)) for q in _QUALITIES], dtype=np.int64)


def estimate_quality(quantization: Optional[Dict[int, Sequence[int]]]) -> Optional[int]:
    """IJG-equivalent quality 1-100 from PIL's ``Image.quantization`` (None when there are no 64-entry tables)."""
    if not quantization or len(quantization.get(0, ())) != 64:
        return None
    chrom = tuple(quantization[1]) if len(quantization.get(1, ())) == 64 else None
    return _nearest_quality(tuple(quantization[0]), chrom)


@functools.lru_cache(maxsize=256)  # a data set has few distinct tables
def _nearest_quality(lum: Tuple[int, ...], chrom: Optional[Tuple[int, ...]]) -> int:
    d = np.abs(_LUM - np.array(lum, dtype=np.int64)).sum(axis=1)
    if chrom is not None:
        d = d + np.abs(_CHROM - np.array(chrom, dtype=np.int64)).sum(axis=1)
    best = np.flatnonzero(d == d.min())
    return int(_QUALITIES[best[-1]])  # ties (e.g. tables of all 1s): the highest quality


def quality_bucket(quality: int, step: int = 5) -> str:
    """``quality`` rounded to the nearest ``step`` (halves up), as a histogram key."""
    return str(int(quality / step + 0.5) * step)


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
