"""The one place that validates and normalises an image file (packer, evaluate and predict use it).

Policy (what every loader later gets is upright 8-bit RGB):

* Accepted formats, judged by content, never by extension: JPEG, PNG, WebP, BMP, MPO (multi-picture JPEG
  from cameras and phones), TIFF, AVIF (when the installed Pillow reads it), HEIF/HEIC (only when a Pillow
  plugin such as ``pillow-heif`` is installed: none is required). GIF, ICO, DNG, ... are skipped as
  ``unsupported-format``; animated PNG/WebP/AVIF and multi-page TIFF as ``animated`` (no frame is chosen for
  you). An MPO's extra images (second eye, preview, gain map) are not frames of an animation: its first
  image is the picture.
* Original bytes are kept (re-encoding destroys the artifacts a detector learns) when the file is an
  8-bit RGB or grayscale JPEG/PNG/WebP without an EXIF rotation: every loader decodes those to RGB. For an
  MPO file with that content the first image's own JPEG bytes are kept (``mpo-first-frame``:
  ``shard_tools.jpeg.mpo_first_image``), since OpenCV and DALI decode them exactly like PIL.
* Everything else is re-encoded as a lossless PNG of the upright RGB pixels, and the reason is
  recorded: ``cmyk`` (JPEG CMYK/YCCK), ``16-bit`` (16-bit PNG/TIFF: the high byte is kept), ``low-bit-depth``
  (1/2/4-bit PNG), ``alpha`` (RGBA/LA: the alpha channel is dropped and the stored colour values kept,
  as ``PIL.convert("RGB")``, torchvision ``ImageReadMode.RGB`` and DALI do), ``palette`` (palette images,
  expanded to RGB), ``bmp``, ``tiff``, ``avif``, ``heif`` (formats the loaders do not all decode),
  ``exif-rotated`` (EXIF orientation 2-8: pixels transposed upright).
* Every file is fully decoded with PIL's ``Image.load()`` (``ImageFile.LOAD_TRUNCATED_IMAGES`` False;
  Pillow's libjpeg-turbo decodes these faces as fast as torchvision's ``decode_jpeg``, 0.2 ms, and
  the packer's workers then never import torch: 2-3 s and ~600 MB less per worker). Checked
  against DALI's CPU decoder (libjpeg-turbo): it fails on exactly the truncated JPEGs PIL rejects here and
  decodes, like PIL, JPEGs with bytes after the end marker or with corrupt entropy data (libjpeg warns and
  fills), so those are kept as they are.
* JPEG sources (JPEG, MPO) get ``ImageInfo.jpeg_quality``, estimated from their quantisation tables
  (``shard_tools.jpeg.estimate_quality``).

Skip reasons (``BadImage.reason``, a fixed vocabulary, see ``REASONS``): ``missing``, ``broken-symlink``,
``not-a-file`` (directory, FIFO, socket, device), ``unreadable`` (permissions, I/O error), ``zero-byte``,
``not-an-image``, ``unsupported-format``, ``animated``, ``truncated``, ``corrupt``, ``unsupported-mode``,
``too-small`` (shorter side < ``min_size``), ``too-large`` (more than ``max_pixels`` pixels, or a file over
``max_bytes``: PIL's decompression-bomb guard is reported the same way); the packer adds
``video-needs-faces`` for a video given without ``--faces``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from shard_tools.jpeg import estimate_quality, mpo_first_image

if TYPE_CHECKING:
    from shard_tools.storage import StorageError

with contextlib.suppress(ImportError):  # HEIF/HEIC only where its decoder is installed; never required
    from pillow_heif import register_heif_opener

    register_heif_opener()

REASONS = (
    "missing", "broken-symlink", "not-a-file", "unreadable", "zero-byte", "not-an-image",
    "unsupported-format", "animated", "truncated", "corrupt", "unsupported-mode", "too-small", "too-large",
    "video-needs-faces",
)
ACCEPTED_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "png", "TIFF": "png",
                    "AVIF": "png", "HEIF": "png"}
_REENCODED = ("BMP", "TIFF", "AVIF", "HEIF")  # always stored as PNG: not every loader decodes them
_DNG_VERSION = 50706  # TIFF tag of a DNG raw file: PIL would read only its small embedded preview
DEFAULT_MIN_SIZE = 32
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 256 * 2**20
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadImage(Exception):
    """An input that cannot be used; ``reason`` is one of ``REASONS``, ``detail`` a one-line explanation."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        detail = " ".join(str(detail).split())[:300]
        super().__init__(reason, detail)  # both in args: the exception pickles across processes
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass(frozen=True)
class ImageInfo:
    """What ``inspect_file`` learned: ``normalized`` is None when the original bytes are kept, else why not.

    ``width``/``height`` are those of the stored (upright) image; ``ext`` the tar member extension;
    ``jpeg_quality`` the estimated quality of a JPEG source (None for other formats).
    """

    sha256: str
    nbytes: int
    format: str
    mode: str
    width: int
    height: int
    normalized: Optional[str]
    ext: str
    jpeg_quality: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


def read_source(path: Union[str, Path], max_bytes: int = DEFAULT_MAX_BYTES,
                storage_options: Optional[dict] = None) -> bytes:
    """`read_bytes` for a file, or the object at a URL (``s3://...``, read through `shard_tools.storage` with its
    retries) with the same ``zero-byte``/``too-large`` checks; a storage failure is ``missing`` (no such object)
    or ``unreadable`` with the storage error's one line."""
    if "://" not in str(path):
        return read_bytes(path, max_bytes)
    from shard_tools import storage

    try:
        n = storage.size(path, storage_options=storage_options)
        if n == 0:
            raise BadImage("zero-byte", "file is empty")  # the words of a local file: same manifest
        if n > max_bytes:
            raise BadImage("too-large", f"{n} bytes > {max_bytes}")
        return storage.read_bytes(path, storage_options=storage_options, expected_size=n)
    except storage.StorageError as e:
        raise unreadable_object(e) from None


def unreadable_object(e: "StorageError") -> BadImage:
    """The skip for a URL input whose read failed with ``e``: ``missing`` (no such object) or ``unreadable``."""
    return BadImage("missing" if e.kind == "not-found" else "unreadable", e.message)


def read_bytes(path: Union[str, Path], max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a regular file; raise BadImage (missing, broken-symlink, not-a-file, unreadable, zero-byte, too-large)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise BadImage("broken-symlink", f"symlink to {os.readlink(path)} points nowhere") from None
        raise BadImage("missing", "no such file") from None
    except OSError as e:
        raise BadImage("unreadable", e.strerror or str(e)) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "special file (FIFO, socket or device)"
        raise BadImage("not-a-file", f"is a {kind}")
    if st.st_size == 0:
        raise BadImage("zero-byte", "file is empty")
    if st.st_size > max_bytes:
        raise BadImage("too-large", f"{st.st_size} bytes > {max_bytes}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadImage("unreadable", e.strerror or str(e)) from None


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"BM", "BMP"), (b"GIF8", "GIF"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def _magic(data: bytes) -> Optional[str]:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        return "AVIF" if brand in (b"avif", b"avis") else "HEIF" if brand in _HEIF_BRANDS else None
    return next((kind for magic, kind in _MAGIC if data.startswith(magic)), None)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, never be padded with gray
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply max_pixels ourselves
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage("too-large", str(e)) from None
    except UnidentifiedImageError:
        kind = _magic(data)
        if kind in ("AVIF", "HEIF"):
            raise BadImage("unsupported-format", f"{kind}: no decoder for it is installed "
                           "(Pillow with AVIF support, or the pillow-heif plugin, reads it)") from None
        if kind:
            raise BadImage("corrupt", f"starts like a {kind} file but its header does not parse") from None
        raise BadImage("not-an-image", "content is not a recognised image format") from None
    except Exception as e:  # PIL plugins raise many types on malformed headers
        raise _decode_error(e, "cannot read the header") from None
    if im.format not in ACCEPTED_FORMATS:
        raise BadImage("unsupported-format", f"{im.format} is not accepted ({', '.join(ACCEPTED_FORMATS)})")
    if im.format == "TIFF" and _DNG_VERSION in getattr(im, "tag_v2", {}):
        raise BadImage("unsupported-format", "DNG raw file: PIL reads only its embedded preview")
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage("too-large", f"{w}x{h} = {w * h} pixels > --max-pixels {max_pixels}")
    return im


def _decode_error(e: Exception, what: str) -> BadImage:
    msg = f"{what}: {type(e).__name__}: {e}"
    if any(k in str(e).lower() for k in ("truncated", "end of file", "broken data stream", "premature")):
        return BadImage("truncated", msg)
    return BadImage("corrupt", msg)


def _load(im: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Image.DecompressionBombError as e:
        raise BadImage("too-large", str(e)) from None
    except Exception as e:
        raise _decode_error(e, "cannot decode") from None


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # malformed EXIF: the pixels are fine, decoders ignore it
        return 1
    return value if value in _TRANSPOSE else 1


def _png_bit_depth(data: bytes) -> int:
    return data[24] if len(data) > 25 and data[12:16] == b"IHDR" else 8


def _normalize_reason(im: Image.Image, data: bytes, orientation: int) -> Optional[str]:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I") or (im.format == "PNG" and _png_bit_depth(data) == 16):
        return "16-bit"
    if mode == "F":
        raise BadImage("unsupported-mode", "32-bit float pixels")
    if im.format in _REENCODED:
        if mode not in _CONVERTIBLE:
            raise BadImage("unsupported-mode", f"pixel mode {mode}")
        return im.format.lower()
    if mode in ("CMYK", "YCbCr") and im.format == "JPEG":
        return "cmyk"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        return "alpha"
    if mode in ("P", "PA"):
        return "palette"
    if mode == "1" or (im.format == "PNG" and _png_bit_depth(data) < 8):
        return "low-bit-depth"
    if mode not in ("RGB", "L"):
        raise BadImage("unsupported-mode", f"pixel mode {mode}")
    if im.format == "MPO":  # its first image could not be cut out as a plain JPEG
        return "mpo"
    if orientation != 1:
        return "exif-rotated"
    return None


_CONVERTIBLE = ("RGB", "L", "RGBA", "LA", "La", "RGBa", "RGBX", "1", "CMYK", "YCbCr", "P", "PA",
                "I", "I;16", "I;16B", "I;16L")


def _to_rgb(im: Image.Image, orientation: int) -> Image.Image:
    mode = im.mode
    if mode.startswith("I"):
        arr = np.asarray(im).astype(np.int64)
        arr = np.clip(arr >> 8 if arr.max() > 255 else arr, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, "L")
    elif mode in ("P", "PA"):
        im = im.convert("RGBA")
    elif mode not in _CONVERTIBLE:
        raise BadImage("unsupported-mode", f"pixel mode {mode}")
    if im.mode != "RGB":
        im = im.convert("RGB")
    if orientation in _TRANSPOSE:
        im = im.transpose(_TRANSPOSE[orientation])
    return im


def inspect_bytes(
    data: bytes, *, min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageInfo:
    """Validate encoded image bytes with a full decode; raise BadImage, else return ImageInfo."""
    if not data:
        raise BadImage("zero-byte", "no data")
    try:
        return _inspect(data, min_size, max_pixels)
    except BadImage:
        raise
    except Exception as e:  # anything else a malformed file provokes inside PIL
        raise _decode_error(e, "cannot decode") from None


def _inspect(data: bytes, min_size: int, max_pixels: int, *, whole_mpo: bool = True) -> ImageInfo:
    im = _open(data, max_pixels)
    with im:
        if im.format == "MPO":
            if not whole_mpo:
                raise BadImage("corrupt", "the first image of the MPO file still reads as an MPO file")
            info = _inspect_mpo(data, min_size, max_pixels)
            if info is not None:
                return info
        elif getattr(im, "n_frames", 1) > 1:
            kind = "pages" if im.format == "TIFF" else "frames"
            raise BadImage("animated", f"{im.format} with {im.n_frames} {kind}")
        w, h = im.size
        if min(w, h) < min_size:
            raise BadImage("too-small", f"{w}x{h} < --min-size {min_size}")
        mode = im.mode
        if im.format == "JPEG" and mode == "RGB":
            orientation = _orientation(im)  # both from the JPEG header
            reason = _normalize_reason(im, data, orientation)
            if reason is None:
                # Still a full decode (every entropy-coded block, IDCT, upsampling: truncation and
                # corruption fail exactly as before), minus the YCbCr->RGB step, which cannot fail:
                # ~40% less time per JPEG.
                im.draft("YCbCr", im.size)
            _load(im)
        else:
            _load(im)
            orientation = _orientation(im)
            reason = _normalize_reason(im, data, orientation)
        if reason is not None:
            _to_rgb(im, orientation)  # proves it converts; pack re-creates the bytes when writing
        if orientation in (5, 6, 7, 8) and reason is not None:
            w, h = h, w
        is_jpeg = im.format in ("JPEG", "MPO")
        return ImageInfo(
            sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data), format="jpeg" if is_jpeg else im.format.lower(),
            mode=mode, width=w, height=h, normalized=reason,
            ext=ACCEPTED_FORMATS[im.format] if reason is None else "png",
            jpeg_quality=estimate_quality(getattr(im, "quantization", None)) if is_jpeg else None,
        )


def _inspect_mpo(data: bytes, min_size: int, max_pixels: int) -> Optional[ImageInfo]:
    """An MPO file judged by its first image's plain JPEG (kept as ``mpo-first-frame`` when it would be
    kept as a JPEG); None when that image cannot be cut out cleanly: the caller then re-encodes frame 0."""
    try:
        info = _inspect(mpo_first_image(data), min_size, max_pixels, whole_mpo=False)
    except (ValueError, BadImage):
        return None
    return replace(info, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data),
                   normalized=info.normalized or "mpo-first-frame")


def inspect_file(
    path: Union[str, Path], *, min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ImageInfo:
    """Read, hash and fully decode one file (content decides the format, not the extension)."""
    return inspect_bytes(read_bytes(path, max_bytes), min_size=min_size, max_pixels=max_pixels)


def normalized_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """A lossless PNG of the upright RGB pixels of ``data`` (deterministic: same input, same bytes)."""
    buf = io.BytesIO()
    _rgb_image(data, max_pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _rgb_image(data: bytes, max_pixels: int) -> Image.Image:
    im = _open(data, max_pixels)
    _load(im)
    try:
        return _to_rgb(im, _orientation(im))
    except BadImage:
        raise
    except Exception as e:
        raise _decode_error(e, "cannot convert to RGB") from None


def load_rgb(src: Union[str, Path, bytes], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a file or encoded bytes to an upright RGB ``uint8`` array ``[H, W, 3]``; raise BadImage."""
    data = src if isinstance(src, (bytes, bytearray)) else read_bytes(src)
    if not data:
        raise BadImage("zero-byte", "no data")
    return np.asarray(_rgb_image(bytes(data), max_pixels), dtype=np.uint8)


def stored_bytes(data: bytes, info: ImageInfo, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The bytes that go into a shard for ``info``: the original, an MPO's first JPEG, or the normalised PNG."""
    if info.normalized is None:
        return data
    if info.normalized == "mpo-first-frame":
        return mpo_first_image(data)
    return normalized_bytes(data, max_pixels=max_pixels)
