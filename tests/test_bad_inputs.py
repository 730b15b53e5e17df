"""A corpus of bad and awkward inputs: each bad one skipped with the right reason, every good one packed.

Also checks the normalisation policy of shard_tools.imageio (CMYK, 16-bit, alpha, palette, BMP,
EXIF rotation → lossless upright RGB PNG; 8-bit RGB/gray JPEG/PNG/WebP kept byte for byte) and that
DALI's own CPU decoder reads every packed image.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import make_face, make_image_dirs, write_image
from PIL import Image, ImageOps

from shard_tools.imageio import BadImage, inspect_bytes, load_rgb, normalized_bytes
from shard_tools.pack import main as pack_main


def encode(arr: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 100_000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


def build_corpus(root: Path):
    """Write good and bad files under root/real and root/fake; returns (good {path: expected normalized}, bad {path: reason})."""
    rng = np.random.default_rng(21)
    real, fake = make_image_dirs(root, n_real=4, n_fake=4, size=40, seed=2)
    good = {str(p): None for p in sorted(real.iterdir()) + sorted(fake.iterdir())}
    bad = {}
    face = make_face(rng, 48)
    jpg = encode(face, "JPEG", quality=90)

    def put(path: Path, data: bytes, expect, is_good: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        (good if is_good else bad)[str(path)] = expect

    # good, kept byte for byte
    put(real / "gray.jpg", encode(face[..., 0], "JPEG"), None, True)
    put(real / "rgb.png", encode(make_face(rng, 40), "PNG"), None, True)
    put(real / "lossy.webp", encode(make_face(rng, 40), "WEBP", quality=80), None, True)
    put(real / "png_named.jpg", encode(make_face(rng, 40), "PNG"), None, True)  # content wins over extension
    put(real / "trailing.jpg", encode(make_face(rng, 40), "JPEG") + b"\0garbage after EOI" * 4, None, True)
    put(real / "folder.jpg" / "inside.jpg", encode(make_face(rng, 40), "JPEG"), None, True)  # dir named like an image
    # good, normalised to a lossless upright RGB PNG
    put(fake / "cmyk.jpg", encode(make_face(rng, 40, fake=True), "JPEG", mode="CMYK"), "cmyk", True)
    put(fake / "deep.png", encode(make_face(rng, 40)[..., 0].astype(np.uint16) * 257, "PNG"), "16-bit", True)
    put(fake / "rgba.png", encode(np.dstack([make_face(rng, 40), np.full((40, 40, 1), 7, np.uint8)]), "PNG"), "alpha", True)
    put(fake / "la.png", encode(make_face(rng, 40), "PNG", mode="LA"), "alpha", True)
    put(fake / "palette.png", encode(make_face(rng, 40), "PNG", mode="P"), "palette", True)
    put(fake / "bilevel.png", encode(make_face(rng, 40), "PNG", mode="1"), "low-bit-depth", True)
    put(fake / "pic.bmp", encode(make_face(rng, 40), "BMP"), "bmp", True)
    put(fake / "scan.tif", encode(make_face(rng, 40), "TIFF"), "tiff", True)
    exif = Image.Exif()
    exif[0x0112] = 6
    put(fake / "rotated.jpg", encode(make_face(rng, 48)[:, :36], "JPEG", exif=exif.tobytes()), "exif-rotated", True)
    # bad
    put(real / "empty.jpg", b"", "zero-byte", False)
    put(real / "notes.jpg", b"this is a text file, not an image\n" * 20, "not-an-image", False)
    put(real / "doc.pdf", b"%PDF-1.4\n" + b"0" * 300, "not-an-image", False)
    put(real / "half.jpg", jpg[: len(jpg) // 2], "truncated", False)
    png = encode(face, "PNG")
    put(real / "half.png", png[: len(png) // 2], "truncated", False)
    put(real / "noise_header.jpg", b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 600, dtype=np.uint8)), "truncated", False)
    zero_sof = bytearray(jpg)
    sof = zero_sof.find(b"\xff\xc0")
    zero_sof[sof + 5:sof + 9] = bytes(4)  # frame header says 0x0 pixels
    put(real / "zero_sof.jpg", bytes(zero_sof), "corrupt", False)
    put(real / "bad_ihdr.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "corrupt", False)
    put(real / "anim.gif", encode(face, "GIF"), "unsupported-format", False)
    put(real / "icon.ico", encode(face, "ICO"), "unsupported-format", False)
    put(fake / "anim.webp", encode(face, "WEBP", save_all=True, append_images=[Image.fromarray(255 - face)]), "animated", False)
    put(fake / "anim.png", encode(face, "PNG", save_all=True, append_images=[Image.fromarray(255 - face)]), "animated", False)
    put(fake / "tiny.jpg", encode(make_face(rng, 16), "JPEG"), "too-small", False)
    put(fake / "thin.png", encode(np.zeros((200, 20, 3), np.uint8), "PNG"), "too-small", False)
    put(fake / "big.jpg", encode(np.zeros((160, 160, 3), np.uint8), "JPEG"), "too-large", False)  # > --max-pixels 20000
    put(fake / "bomb.png", bomb_png(), "too-large", False)
    put(fake / ".DS_Store", b"\0\0\0\1Bud1", "hidden", False)
    put(fake / "._f0000.jpg", b"\0\5\26\7", "hidden", False)
    put(fake / ".ipynb_checkpoints" / "copy.jpg", jpg, None, False)  # inside a hidden folder: not walked
    bad[str(fake / ".ipynb_checkpoints")] = "hidden"
    del bad[str(fake / ".ipynb_checkpoints" / "copy.jpg")]
    os.symlink(fake / "does-not-exist.jpg", fake / "dangling.jpg")
    bad[str(fake / "dangling.jpg")] = "broken-symlink"
    os.symlink("loop_b.jpg", fake / "loop_a.jpg")  # a symlink loop: stat fails with ELOOP, even for root
    os.symlink("loop_a.jpg", fake / "loop_b.jpg")
    bad[str(fake / "loop_a.jpg")] = bad[str(fake / "loop_b.jpg")] = "unreadable"
    os.mkfifo(fake / "pipe.jpg")  # opening a FIFO would block forever
    bad[str(fake / "pipe.jpg")] = "not-a-file"
    os.symlink(fake, fake / "sub_loop")  # a folder symlink back to an ancestor
    bad[str(fake / "sub_loop")] = "symlink-loop"
    return good, bad


@pytest.fixture(scope="module")
def corpus_pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    good, bad = build_corpus(root / "in")
    out = root / "out"
    rc = pack_main(["--real", str(root / "in" / "real"), "--fake", str(root / "in" / "fake"), "--out", str(out),
                    "--workers", "2", "--max-pixels", "20000", "--min-shards", "1", "--val-fraction", "0.3"])
    assert rc == 0
    return root, good, bad, out


def test_each_bad_input_skipped_with_its_reason(corpus_pack):
    root, good, bad, out = corpus_pack
    assert len(bad) >= 15 and len(set(bad.values())) >= 12
    m = json.loads((out / "manifest.json").read_text())
    got = {s["path"]: s["reason"] for s in m["skipped"]}
    assert got == bad
    for s in m["skipped"]:
        assert s["detail"] and "\n" not in s["detail"]
    assert m["counts"]["real"]["kept"] + m["counts"]["fake"]["kept"] == len(good)
    assert sum(c["found"] for c in m["counts"].values()) == len(good) + len(bad)


def test_every_good_input_packed_with_the_policy(corpus_pack):
    root, good, bad, out = corpus_pack
    samples = [s for sp in ("train", "val") for s in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False)]
    by_path = {}
    for s in samples:
        meta = json.loads(s["json"])
        by_path[str(Path(meta["root"]) / meta["source"])] = (s, meta)
    assert set(by_path) == set(good)
    for path, expect in good.items():
        s, meta = by_path[path]
        assert meta["normalized"] == expect, path
        original = Path(path).read_bytes()
        assert meta["sha256"] == hashlib.sha256(original).hexdigest()
        assert int(s["cls"]) == meta["label"] == (1 if "/fake/" in path else 0)
        if expect is None:
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[Image.open(io.BytesIO(original)).format]
            assert s[ext] == original, path
        else:
            stored = Image.open(io.BytesIO(s["png"]))
            assert stored.format == "PNG" and stored.mode == "RGB" and stored.size == (meta["width"], meta["height"])
            assert np.array_equal(np.asarray(stored), load_rgb(Path(path)))


def test_normalised_pixels_follow_the_policy(corpus_pack):
    root, good, bad, out = corpus_pack
    fake = root / "in" / "fake"
    src = np.asarray(Image.open(fake / "rgba.png"))
    assert np.array_equal(load_rgb(fake / "rgba.png"), src[..., :3])  # alpha dropped, colours kept
    deep = np.asarray(Image.open(fake / "deep.png")).astype(np.uint16)
    assert np.array_equal(load_rgb(fake / "deep.png")[..., 0], (deep >> 8).astype(np.uint8))
    raw = np.asarray(Image.open(fake / "rotated.jpg").convert("RGB"))  # stored sideways: 48 tall, 36 wide
    upright = load_rgb(fake / "rotated.jpg")
    assert raw.shape == (48, 36, 3) and upright.shape == (36, 48, 3)
    assert np.array_equal(upright, np.rot90(raw, k=-1))  # orientation 6: rotate 90° clockwise to view
    assert np.array_equal(upright, np.asarray(ImageOps.exif_transpose(Image.open(fake / "rotated.jpg"))))
    png = normalized_bytes((fake / "palette.png").read_bytes())
    assert png == normalized_bytes((fake / "palette.png").read_bytes()), "normalisation must be deterministic"


def test_dali_cpu_decoder_reads_every_packed_image(corpus_pack):
    from nvidia.dali import fn, pipeline_def, types

    root, good, bad, out = corpus_pack
    tars = sorted(out.glob("*.tar"))
    n = sum(json.loads((out / "manifest.json").read_text())["splits"][s]["num_samples"] for s in ("train", "val"))

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        img, cls = fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=[str(t.with_suffix(".idx")) for t in tars],
                                         ext=["jpg;png;webp", "cls"], missing_component_behavior="error")
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), cls

    p = pipe()
    p.build()
    images, cls = p.run()
    shapes = [np.asarray(images[i]).shape for i in range(n)]
    assert len(shapes) == n == len(good) and all(len(s) == 3 and s[2] == 3 and min(s[:2]) >= 32 for s in shapes)
    assert sorted(int(np.asarray(cls[i]).tobytes().decode()) for i in range(n)) == sorted(
        1 if "/fake/" in p_ else 0 for p_ in good)


def test_unreadable_permissions(tmp_path: Path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading (the ELOOP case covers 'unreadable')")
    path = write_image(tmp_path / "locked.jpg", make_face(np.random.default_rng(0), 40))
    path.chmod(0)
    from shard_tools.imageio import inspect_file

    with pytest.raises(BadImage) as e:
        inspect_file(path)
    assert e.value.reason == "unreadable"


def test_bad_image_api():
    with pytest.raises(BadImage) as e:
        inspect_bytes(b"GIF89a" + b"\0" * 10)
    err = pickle.loads(pickle.dumps(e.value))  # crosses process boundaries intact
    assert (err.reason, err.detail) == (e.value.reason, e.value.detail) and str(err).startswith(err.reason)
    with pytest.raises(BadImage) as e:
        load_rgb(b"")
    assert e.value.reason == "zero-byte"
    arr = load_rgb(encode(make_face(np.random.default_rng(1), 40), "JPEG"))
    assert arr.dtype == np.uint8 and arr.shape == (40, 40, 3)
    with pytest.raises(BadImage) as e:
        inspect_bytes(bomb_png(3000), max_pixels=1_000_000)
    assert e.value.reason == "too-large" and "max-pixels" in e.value.detail
