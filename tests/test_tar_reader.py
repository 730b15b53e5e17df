"""pipeline.data.tar_reader on real tar files written by Python's tarfile, against webdataset's own reader."""
from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest
from webdataset.tariterators import tarfile_samples

from pipeline.data.tar_reader import TarFormatError, count_samples, iter_samples

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
LONG_DIR = "d" * 70 + "/" + "e" * 40  # a 111-char folder: ustar needs the prefix field, GNU an 'L' member, pax a path


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# (name, data); data None is a directory. Sizes straddle the 512-byte blocks.
MEMBERS: List[Tuple[str, Optional[bytes]]] = [
    ("s0.cls", b"0"),
    ("s0.jpg", blob(1, 511)),
    ("s0.json", b'{"w": 32}'),
    ("a", None),
    ("a/b", None),
    ("a/b/key.jpg", blob(2, 512)),  # key "a/b/key"
    ("a/b/key.cls", b"1"),
    ("README", b"no extension: key None, skipped"),
    ("k2.seg.png", blob(3, 513)),  # ext "seg.png"
    ("k2.cls", b""),
    ("K3.JPG", blob(4, 1024)),  # webdataset lower-cases the extension
    ("__meta__/info.txt", b"metadata: skipped"),
    (f"{LONG_DIR}/long.jpg", blob(5, 100)),
    (f"{LONG_DIR}/long.cls", b"1"),
    ("naïve.jpg", blob(6, 7)),  # non-ASCII: raw UTF-8 in ustar/GNU, a pax path record in pax
    ("last.cls", b"0"),
]


def write_tar(path: Path, fmt: int, members: Sequence[Tuple[str, Optional[bytes]]] = MEMBERS,
              pax_headers: Optional[dict] = None) -> Path:
    with tarfile.open(path, "w", format=fmt, pax_headers=pax_headers or {}) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def reference(path: Path) -> List[dict]:
    # webdataset's dicts are compared whole: it adds only __key__ and __url__ here (__local_path__
    # appears only when the source dict has a "local_path", which tarfile_samples callers do not pass).
    return list(tarfile_samples([{"url": str(path)}]))


def header_offset(path: Path, name: str) -> Tuple[int, int]:
    """(offset of the member's own 512-byte header, offset of its data)."""
    with tarfile.open(path) as tar:
        info = tar.getmember(name)
        return info.offset_data - 512, info.offset_data


def patch_header(path: Path, offset: int, start: int, field: bytes, *, signed: bool = False) -> None:
    """Overwrite ``field`` at ``start`` of the header at ``offset`` and store a valid checksum."""
    raw = bytearray(path.read_bytes())
    hdr = raw[offset:offset + 512]
    hdr[start:start + len(field)] = field
    hdr[148:156] = b" " * 8
    chk = sum(b - 256 if signed and b > 127 else b for b in hdr)
    hdr[148:156] = b"%06o\x00 " % chk if chk >= 0 else b"-%05o\x00 " % -chk
    raw[offset:offset + 512] = hdr
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_samples_as_webdataset(tmp_path: Path, fmt: str) -> None:
    path = write_tar(tmp_path / f"{fmt}.tar", FORMATS[fmt])
    ours = list(iter_samples(str(path)))
    assert ours == reference(path)
    assert [s["__key__"] for s in ours] == ["s0", "a/b/key", "k2", "K3", f"{LONG_DIR}/long", "naïve", "last"]
    assert ours[1] == {"__key__": "a/b/key", "__url__": str(path), "jpg": blob(2, 512), "cls": b"1"}
    assert ours[2] == {"__key__": "k2", "__url__": str(path), "seg.png": blob(3, 513), "cls": b""}
    assert ours[3]["jpg"] == blob(4, 1024) and ours[4]["jpg"] == blob(5, 100)
    assert all(type(v) is bytes for s in ours for k, v in s.items() if not k.startswith("__"))
    assert count_samples(path) == len(ours) == 7  # the same grouping: the __meta__ member is no sample


def test_pax_global_header_and_no_end_blocks(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "g.tar", tarfile.PAX_FORMAT, pax_headers={"comment": "a pax 'g' header"})
    assert path.read_bytes()[156:157] == b"g"
    want = reference(path)
    assert list(iter_samples(path)) == want
    # The same archive cut right after its last member (no end-of-archive blocks): still readable.
    _, data = header_offset(path, "last.cls")
    path.write_bytes(path.read_bytes()[:data + 512])
    assert reference(path) == want
    assert list(iter_samples(path)) == want


def test_gnu_base256_size_and_signed_checksum(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "b.tar", tarfile.GNU_FORMAT)
    header, _ = header_offset(path, "k2.seg.png")
    patch_header(path, header, 124, b"\x80" + (513).to_bytes(11, "big"))  # GNU base-256 size
    header, _ = header_offset(path, "naïve.jpg")  # UTF-8 name: bytes > 127 make the signed sum differ
    patch_header(path, header, 0, "naïve.jpg".encode(), signed=True)
    want = reference(path)
    assert [s["__key__"] for s in want] == ["s0", "a/b/key", "k2", "K3", f"{LONG_DIR}/long", "naïve", "last"]
    assert want[2]["seg.png"] == blob(3, 513)
    assert list(iter_samples(path)) == want


def test_directory_size_field_is_not_data(tmp_path: Path) -> None:
    # tarfile skips no data after directories and links whatever their size field says; so must we.
    path = write_tar(tmp_path / "dir.tar", tarfile.USTAR_FORMAT)
    header, _ = header_offset(path, "a/b")
    patch_header(path, header, 124, b"%011o\x00" % 512)
    header, _ = header_offset(path, "a")  # an old-style directory: type '\0' and a name ending in '/'
    assert path.read_bytes()[header:header + 2] == b"a/"
    patch_header(path, header, 124, b"%011o\x00" % 1024)
    patch_header(path, header, 156, b"\x00")
    want = reference(path)
    assert [s["__key__"] for s in want][:3] == ["s0", "a/b/key", "k2"]
    assert list(iter_samples(path)) == want


@pytest.mark.parametrize("start, stop", [(0, None), (0, 0), (0, 1), (2, 5), (3, 3), (5, 2), (6, None),
                                         (6, 7), (7, None), (0, 100), (100, None), (100, 200)])
def test_start_stop_slice(tmp_path: Path, start: int, stop: Optional[int]) -> None:
    path = write_tar(tmp_path / "s.tar", tarfile.PAX_FORMAT)
    every = list(iter_samples(path))
    assert len(every) == 7
    assert list(iter_samples(path, start, stop)) == every[start:stop]


def test_stops_at_first_member_of_sample_stop(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "t.tar", tarfile.USTAR_FORMAT)
    header, _ = header_offset(path, "k2.cls")  # the second member of sample 2, then cut the file there
    path.write_bytes(path.read_bytes()[:header + 100])
    assert [s["__key__"] for s in iter_samples(path, 0, 2)] == ["s0", "a/b/key"]
    with pytest.raises(TarFormatError):
        list(iter_samples(path, 0, 3))


def test_closing_early_releases_the_mapping(tmp_path: Path) -> None:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux) to see the mapping")
    path = write_tar(tmp_path / "m.tar", tarfile.USTAR_FORMAT)
    samples = iter_samples(path)
    first = next(samples)
    assert str(path) in maps.read_text()
    samples.close()
    assert str(path) not in maps.read_text()
    assert first["jpg"] == blob(1, 511)  # the bytes are copies: still valid after the close


def test_duplicate_extension_in_one_sample(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "d.tar", tarfile.USTAR_FORMAT, [("x.jpg", b"1"), ("x.JPG", b"2")])
    with pytest.raises(ValueError, match="duplicate"):
        reference(path)
    with pytest.raises(TarFormatError, match="duplicate") as err:
        list(iter_samples(path))
    assert str(path) in str(err.value)


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(TarFormatError) as err:
        list(iter_samples(path))
    message = str(err.value)
    for fragment in (str(path),) + fragments:
        assert fragment in message, message
    return message


def test_count_samples_raises_like_iter_samples(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "cut.tar", tarfile.USTAR_FORMAT)
    _, data = header_offset(path, "k2.seg.png")
    path.write_bytes(path.read_bytes()[:data + 100])  # cut inside a member's data
    with pytest.raises(TarFormatError, match="truncated"):
        list(iter_samples(path))
    with pytest.raises(TarFormatError, match="truncated"):
        count_samples(path)


def test_truncated_in_data(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "cut.tar", tarfile.USTAR_FORMAT)
    header, data = header_offset(path, "K3.JPG")
    path.write_bytes(path.read_bytes()[:data + 300])
    expect_error(path, "truncated", "K3.JPG", f"byte {header}", "needs 1024 bytes", f"ends at {data + 300}")


def test_truncated_in_header(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "cut.tar", tarfile.USTAR_FORMAT)
    header, _ = header_offset(path, "k2.seg.png")
    path.write_bytes(path.read_bytes()[:header + 200])
    expect_error(path, "truncated", f"header block at byte {header}", f"ends at {header + 200}")


def test_flipped_header_byte(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "flip.tar", tarfile.GNU_FORMAT)
    header, _ = header_offset(path, "a/b/key.cls")
    raw = bytearray(path.read_bytes())
    raw[header + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    expect_error(path, f"bad header checksum at byte {header}")


def test_bad_size_field(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "size.tar", tarfile.USTAR_FORMAT)
    header, _ = header_offset(path, "s0.json")
    patch_header(path, header, 124, b"0000000001z\x00")
    expect_error(path, f"header at byte {header}", "size field")


def test_empty_random_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    expect_error(empty, "empty")
    noise = tmp_path / "noise.tar"
    noise.write_bytes(blob(7, 4096))
    expect_error(noise, "bad header checksum at byte 0")
    short = tmp_path / "short.tar"
    short.write_bytes(blob(8, 100))
    expect_error(short, "truncated", "header block at byte 0")
    missing = tmp_path / "missing.tar"
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        list(iter_samples(missing))


def test_negative_range_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="start"):
        list(iter_samples(tmp_path / "x.tar", -1))
