"""Helpers the tests share: tiny real test images, the packer run in-process, a CLI's --help text.

`make_face` draws a smooth "real" image; a "fake" is the same kind of image with a faint 2-pixel
checkerboard (the up-sampling artifact of many generators), so a tiny model can learn the task.
Fixtures (shards, a trained checkpoint, servers) live in conftest.py.
"""
from __future__ import annotations

import logging

from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
from PIL import Image


def make_face(rng: np.random.Generator, size: int = 32, fake: bool = False) -> np.ndarray:
    """A uint8 HWC RGB test image: a random smooth blob pattern; fakes add a faint checkerboard."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)
    for c in range(3):
        cx, cy, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.4)
        img[..., c] = 60 + 150 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    img += rng.normal(0, 4, img.shape)
    if fake:
        checker = ((np.indices((size, size)).sum(0) % 2) * 2 - 1).astype(np.float32)
        img += 18 * checker[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: Path, array: np.ndarray, **save_kwargs) -> Path:
    """Write ``array`` (HWC uint8) with PIL; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        save_kwargs.setdefault("quality", 92)
    Image.fromarray(array).save(path, **save_kwargs)
    return path


def make_image_dirs(root: Path, n_real: int = 12, n_fake: int = 12, size: int = 32, seed: int = 0) -> Tuple[Path, Path]:
    """``root/real`` and ``root/fake`` with distinct tiny JPEGs; returns (real_dir, fake_dir)."""
    rng = np.random.default_rng(seed)
    real, fake = root / "real", root / "fake"
    for i in range(n_real):
        write_image(real / f"r{i:04d}.jpg", make_face(rng, size, fake=False))
    for i in range(n_fake):
        write_image(fake / f"f{i:04d}.jpg", make_face(rng, size, fake=True))
    return real, fake


def pack_dirs(real: Path, fake: Path, out: Path, *extra: str) -> Path:
    """Run the real packer CLI in-process; fails the test on a non-zero exit."""
    from shard_tools.pack import main as pack_main

    rc = pack_main(["--real", str(real), "--fake", str(fake), "--out", str(out), "--workers", "1", *extra])
    assert rc == 0, f"deepfake-pack exited {rc}"
    return out


def help_text(main, capsys) -> str:
    """Run ``main(["--help"])`` of a CLI; assert it exits 0 and return what it printed."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def one_error(caplog) -> str:
    """The one ERROR record a refused command logged: one line, no traceback."""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0], errors[0]
    return errors[0]


def usage_error(capsys, main, argv) -> str:
    """The one stderr line of an argparse refusal (exit 2)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]
