"""A fast reader of local WebDataset tar shards: samples as webdataset sample dicts.

`iter_samples` yields what ``webdataset.tariterators.tarfile_samples`` yields for a local,
uncompressed tar, at ~3 us per member instead of ~25 (measured on a packed faces shard): it
memory-maps the file and walks the 512-byte headers with slicing and ``int(field, 8)``, where
``tarfile`` builds a ``TarInfo`` per member and reads through a stream object. Samples before ``start`` are found by
walking their headers only (their data is never copied), and reading stops at the first member of
sample ``stop``, so a DataLoader worker that owns samples ``[start, stop)`` of a shard pays for
little else.

Supported: ustar (with the 155-byte name prefix), GNU (base-256 sizes, ``L`` long names, ``K``
long link names), pax (``x``/``X`` extended headers: ``path`` and ``size``; ``g`` global headers
are skipped), regular members (``0``, ``\0``, ``7``); links, directories, devices and unknown types
are skipped as webdataset skips them. The archive ends at the first all-zero block or at end of
file on a block boundary.

Grouping is webdataset 1.0.2's ``group_by_keys`` with its default arguments: ``key, ext =
base_plus_ext(name)`` (the library's own function), members whose key is None are dropped, the
extension is lower-cased, consecutive members with the same key form one sample, and a repeated
extension within one sample is an error. Metadata members that ``tar_file_iterator`` drops
(``__name__`` at the top level, or anything under a ``__name__/`` folder) are dropped too.

Where this differs from webdataset (deliberately):

* A corrupt archive raises `TarFormatError` naming the file, the byte offset and the problem.
  ``tarfile`` in stream mode raises only when the *first* header is bad; a bad checksum or a cut
  header later on silently ends the shard there, and a bad pax ``size`` becomes 0.
* Local uncompressed files only: no ``pipe:``/URLs, no transparent gzip/bz2/xz (``r|*``).
* pax global headers (``g``) are skipped; ``tarfile`` would apply their ``path``/``size`` to every
  later member, which no shard writer relies on.
* The ustar prefix (bytes 345-500) is used only with the POSIX magic ``ustar\0``; ``tarfile``
  also reads it under the GNU magic, where GNU tar may keep access/change times there.
* GNU sparse members (``S`` or pax ``GNU.sparse.*``) raise `TarFormatError` instead of being
  expanded.
* A repeated extension is detected only within the samples yielded (skipped ones are not read).
* Names are decoded as UTF-8 with ``surrogateescape``, which is what ``tarfile`` does where the
  file system encoding is UTF-8 (Linux); elsewhere non-ASCII ustar/GNU names may differ.
* ``__local_path__`` is never added (webdataset adds it only when the source dict has a
  ``local_path``, which ``tarfile_samples`` callers do not pass).
"""
from __future__ import annotations

import mmap
import os
import re
import zlib
from typing import Dict, Iterator, Optional, Tuple, Union

from webdataset.tariterators import base_plus_ext

__all__ = ["TarFormatError", "count_samples", "iter_members", "iter_samples"]

BLOCK = 512

_ZERO_BLOCK = bytes(BLOCK)

_POSIX_MAGIC = b"ustar\x00"

# Type flags (bytes of the header at offset 156, as ints).
_REGULAR = frozenset(b"0\x007")  # regular, old-style regular, contiguous

_NO_DATA = frozenset(b"123456")  # links, devices, directories, FIFOs: tarfile skips no data after them

_DIRECTORY = ord("5")

_PAX, _PAX_SOLARIS, _PAX_GLOBAL = ord("x"), ord("X"), ord("g")

_GNU_LONGNAME, _GNU_LONGLINK, _GNU_SPARSE = ord("L"), ord("K"), ord("S")

_HEADER_KINDS = frozenset((_PAX, _PAX_SOLARIS, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK))  # describe the next member

_META = re.compile(r"__[^/]*__($|/)")  # webdataset tar_file_iterator's default skip_meta


class TarFormatError(ValueError):
    """A file that is not a readable tar archive; the message names the file, the byte offset and the problem."""


def iter_samples(path: Union[str, "os.PathLike[str]"], start: int = 0, stop: Optional[int] = None) -> Iterator[dict]:
    """Samples ``[start, stop)`` of a local tar shard, as webdataset sample dicts.

    Each sample is ``{"__key__": key, "__url__": path, ext: bytes, ...}`` as
    ``webdataset.tariterators.tarfile_samples([{"url": path}])`` yields it; a sample's index
    counts distinct consecutive keys from 0. ``stop=None`` reads to the end; an empty range
    (``stop <= start``) yields nothing without opening the file. Each call maps the file on its
    own, and closing the generator (or exhausting it) releases the mapping.

    Args:
        path: a local, uncompressed tar file.
        start: index of the first sample to yield; earlier samples are skipped by their headers.
        stop: index of the first sample not to yield; reading stops where it begins.

    Raises:
        TarFormatError: the file is empty, is not a tar, is truncated or corrupt, or repeats an
            extension within one sample.
        OSError: the file cannot be opened (FileNotFoundError for a missing one).
        ValueError: a negative ``start`` or ``stop``.
    """
    if start < 0 or (stop is not None and stop < 0):
        raise ValueError(f"iter_samples: start and stop must be >= 0 (or stop None), got start={start}, stop={stop}")
    url = os.fspath(path)
    if stop is not None and stop <= start:
        return
    buf = _map(url)
    try:
        index, key_now, sample = -1, None, None
        for key, ext, name, offset, size in _keyed_members(buf, url):
            if key != key_now:
                if sample is not None:
                    yield sample
                    sample = None
                index, key_now = index + 1, key
                if stop is not None and index >= stop:
                    return
                if index >= start:
                    sample = {"__key__": key, "__url__": url}
            if sample is not None:
                if ext in sample:
                    raise TarFormatError(f"{url}: member {name} at byte {offset - BLOCK}: sample {key} already has "
                                         f"a .{ext} member (duplicate file name in the tar)")
                sample[ext] = buf[offset:offset + size]  # a copy: closing the mapping never fails on it
        if sample is not None:
            yield sample
    finally:
        buf.close()


def iter_stream_samples(fileobj, url: str, start: int = 0, stop: Optional[int] = None) -> Iterator[dict]:
    """Samples ``[start, stop)`` of a tar read from a stream (a remote object opened through fsspec),
    with webdataset's own tar iterator and key grouping: the same sample dicts as `iter_samples`.
    Raises TarFormatError naming ``url`` for a stream that is not a readable tar."""
    import tarfile

    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def members():
        for item in tar_file_iterator(fileobj):
            item["__url__"] = url
            yield item

    index = 0
    try:
        for sample in group_by_keys(members()):
            if stop is not None and index >= stop:
                return
            if index >= start:
                yield sample
            index += 1
    except (tarfile.TarError, ValueError) as e:
        raise TarFormatError(f"{url}: cannot read it as a tar stream after {index} samples ({e})") from None


def iter_members(path: Union[str, "os.PathLike[str]"]) -> Iterator[Tuple[str, str, int, int]]:
    """``(key, ext, data offset, size)`` of each member of a local tar shard that belongs to a sample,
    in archive order, grouped by the same rules as `iter_samples` (extension lower-cased), from the
    headers alone: for readers that fetch member data by offset later. Raises as `iter_samples`."""
    url = os.fspath(path)
    buf = _map(url)
    try:
        for key, ext, _, offset, size in _keyed_members(buf, url):
            yield key, ext, offset, size
    finally:
        buf.close()


def count_samples(path: Union[str, "os.PathLike[str]"]) -> int:
    """The number of samples `iter_samples` yields for ``path`` (distinct consecutive keys), from the
    headers alone: no member data is copied. Raises as `iter_samples` does."""
    count, key_now = 0, None
    for key, *_ in iter_members(path):
        if key != key_now:
            count, key_now = count + 1, key
    return count


def _map(url: str) -> mmap.mmap:
    """The file mapped read-only (the mapping outlives the file object); an empty file is an error."""
    with open(url, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            raise TarFormatError(f"{url}: empty file (0 bytes) at byte 0: not a tar archive")
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)


def _keyed_members(buf: mmap.mmap, url: str) -> Iterator[Tuple[str, str, str, int, int]]:
    """(key, ext, name, data offset, size) of each member that belongs to a sample, in archive order,
    the extension lower-cased: webdataset's metadata members and key-less names are left out."""
    for name, offset, size in _members(buf, url):
        if name.startswith("__") and (("/" not in name and name.endswith("__")) or _META.match(name)):
            continue
        key, ext = base_plus_ext(name)
        if key is not None:
            yield key, ext.lower(), name, offset, size


def _members(buf: mmap.mmap, url: str) -> Iterator[Tuple[str, int, int]]:
    """(name, data offset, size) of each regular member, in archive order."""
    end = len(buf)
    adler = zlib.adler32
    pos = 0
    long_name: Optional[str] = None  # from a GNU 'L' member, for the next header
    pax: Optional[Dict[str, str]] = None  # from a pax 'x' header, for the next header
    first = 0  # where the next member's own headers (pax, 'L') begin, for error messages
    while True:
        pending = long_name is not None or pax is not None
        if pos + BLOCK > end:
            _check_end_of_file(url, pos, end, pending, first)
            return  # end of file on a block boundary: an archive without end-of-archive blocks
        hdr = buf[pos:pos + BLOCK]
        if not _valid_header(hdr, adler, url, pos, pending, first):
            return  # end-of-archive block
        kind = hdr[156]
        if kind == 0 and _name(hdr, None, None).endswith("/"):
            kind = _DIRECTORY  # an old-style (V7) directory, as tarfile reads it
        size = _size(hdr, url, pos)
        if pax is not None and "size" in pax and kind not in _HEADER_KINDS:
            size = _pax_size(pax, url, first)
        data = pos + BLOCK
        if data + size > end and kind not in _NO_DATA:
            raise TarFormatError(f"{url}: truncated: member {_name(hdr, long_name, pax)} at byte {pos} needs "
                                 f"{size} bytes, file ends at {end}")
        pos = data + ((size + BLOCK - 1) & ~(BLOCK - 1))
        if kind in _REGULAR:
            name = _name(hdr, long_name, pax)
            long_name = pax = None
            first = pos
            yield name, data, size
        elif kind == _PAX or kind == _PAX_SOLARIS:
            pax = _pax_records(buf[data:data + size], url, data - BLOCK)
            if any(k.startswith("GNU.sparse.") for k in pax):
                raise TarFormatError(f"{url}: pax header at byte {data - BLOCK} describes a GNU sparse member, "
                                     "which this reader does not support")
        elif kind == _GNU_LONGNAME:
            raw = buf[data:data + size]
            long_name = raw[:raw.find(b"\x00")] if b"\x00" in raw else raw
            long_name = long_name.decode("utf-8", "surrogateescape")
        elif kind == _GNU_SPARSE:
            raise TarFormatError(f"{url}: member at byte {data - BLOCK} is a GNU sparse file, "
                                 "which this reader does not support")
        else:  # 'K' long link, 'g' pax global, links, directories, unknown types: nothing to yield
            if kind in _NO_DATA:
                pos = data
            if kind != _GNU_LONGLINK and kind != _PAX_GLOBAL:
                long_name = pax = None
                first = pos


def _check_end_of_file(url: str, pos: int, end: int, pending: bool, first: int) -> None:
    """The file ends before a whole header block at ``pos``: fine only right at the end of a member."""
    if pos == end and not pending:
        return
    if pos == end:
        raise TarFormatError(f"{url}: truncated: file ends at byte {end}, right after the pax or "
                             f"long-name header at byte {first}, before its member")
    if pos > end:
        raise TarFormatError(f"{url}: truncated: file ends at byte {end}, inside the padding of the "
                             f"last member (which should end at byte {pos})")
    raise TarFormatError(f"{url}: truncated: header block at byte {pos} needs 512 bytes, file ends at {end}")


def _valid_header(hdr: bytes, adler, url: str, pos: int, pending: bool, first: int) -> bool:
    """True for a header whose checksum holds, False for the end-of-archive block; else raise."""
    # Unsigned sum with the checksum field as 8 spaces (256). adler32's low half is the byte sum
    # mod 65521, exact for pieces of at most 256 bytes: ~0.4 us against ~2 us for sum(hdr).
    total = (256 + (adler(hdr[:148], 0) & 0xFFFF) + (adler(hdr[156:356], 0) & 0xFFFF)
             + (adler(hdr[356:], 0) & 0xFFFF))
    try:
        checksum = _octal(hdr[148:156])
    except ValueError:
        checksum = None
    if checksum == total or checksum == _signed_sum(hdr):
        return True
    if hdr == _ZERO_BLOCK:
        if pending:
            raise TarFormatError(f"{url}: end-of-archive block at byte {pos} right after a pax or "
                                 f"long-name header (at byte {first}): truncated or corrupt")
        return False
    raise TarFormatError(f"{url}: bad header checksum at byte {pos}: not a tar, or corrupt")


def _pax_size(pax: Dict[str, str], url: str, first: int) -> int:
    try:
        size = int(pax["size"])
    except ValueError:
        size = -1
    if size < 0:
        raise TarFormatError(f"{url}: pax header at byte {first}: size {pax['size']!r} is not a "
                             "non-negative decimal number")
    return size


def _octal(field: bytes) -> int:
    """A NUL/space-terminated octal number field, as tarfile reads it (all blank is 0)."""
    cut = field.find(b"\x00")
    if cut >= 0:
        field = field[:cut]
    return int(field, 8) if field.strip() else 0


def _signed_sum(hdr: bytes) -> int:
    """The checksum some old tars (Sun, NeXT) wrote: bytes summed as signed chars."""
    high = sum(1 for b in hdr[:148] if b & 0x80) + sum(1 for b in hdr[156:] if b & 0x80)
    return 256 + sum(hdr[:148]) + sum(hdr[156:]) - 256 * high


def _size(hdr: bytes, url: str, pos: int) -> int:
    field = hdr[124:136]
    if field[0] == 0x80:  # GNU base-256, for members of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    try:
        size = _octal(field)  # a negative base-256 size (first byte 0xff) fails here too
    except ValueError:
        size = -1
    if size < 0:
        raise TarFormatError(f"{url}: header at byte {pos}: size field {bytes(field)!r} is not a non-negative "
                             "octal number (or GNU base-256): corrupt")
    return size


def _name(hdr: bytes, long_name: Optional[str], pax: Optional[Dict[str, str]]) -> str:
    """The member's path: pax ``path``, else a GNU long name, else the (ustar-prefixed) header name."""
    if pax is not None and "path" in pax:
        return pax["path"].rstrip("/")
    if long_name is not None:
        return long_name
    raw = hdr[:100]
    cut = raw.find(b"\x00")
    name = (raw if cut < 0 else raw[:cut]).decode("utf-8", "surrogateescape")
    if hdr[345] and hdr[257:263] == _POSIX_MAGIC:
        raw = hdr[345:500]
        cut = raw.find(b"\x00")
        name = (raw if cut < 0 else raw[:cut]).decode("utf-8", "surrogateescape") + "/" + name
    return name


def _pax_records(data: bytes, url: str, pos: int) -> Dict[str, str]:
    """The ``"%d %s=%s\\n"`` records of a pax extended header (at byte ``pos``) as a dict."""
    records: Dict[str, str] = {}
    at = 0
    while at < len(data) and data[at]:  # NUL padding after the records ends them, as in tarfile
        digits = data[at:data.find(b" ", at, at + 21)] if b" " in data[at:at + 21] else b""
        length = int(digits) if digits.isdigit() else 0  # counts itself, the space and the newline
        record = data[at:at + length]
        equals = record.find(b"=", len(digits) + 1)
        if equals < 0 or len(record) < length or not record.endswith(b"\n"):
            raise TarFormatError(f"{url}: pax header at byte {pos}: malformed record at byte {pos + BLOCK + at} "
                                 f"({bytes(data[at:at + 40])!r}): corrupt")
        key = record[len(digits) + 1:equals].decode("utf-8", "surrogateescape")
        records[key] = record[equals + 1:-1].decode("utf-8", "surrogateescape")
        at += length
    return records
