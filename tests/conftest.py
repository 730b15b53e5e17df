"""Shared fixtures: tiny real JPEG files and real packed shards (no mocks of torch/DALI/webdataset).

`make_face` draws a smooth "real" image; a "fake" is the same kind of image with a faint 2-pixel
checkerboard (the up-sampling artifact of many generators), so a tiny model can learn the task.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "1")


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


@pytest.fixture
def image_dirs(tmp_path: Path) -> Tuple[Path, Path]:
    """12 real + 12 fake 32x32 JPEGs in tmp_path/{real,fake}."""
    return make_image_dirs(tmp_path / "images")


def help_text(main, capsys) -> str:
    """Run ``main(["--help"])`` of a CLI; assert it exits 0 and return what it printed."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.fixture(scope="session")
def packed(tmp_path_factory) -> Path:
    """A complete pack output: 40 real + 40 fake 48x48 JPEGs, val 25%, small shards (>= 2 per split).

    Session-scoped and read-only: tests must not modify it (copy it first).
    """
    root = tmp_path_factory.mktemp("packed")
    real, fake = make_image_dirs(root / "images", n_real=40, n_fake=40, size=48, seed=1)
    return pack_dirs(real, fake, root / "shards", "--val-fraction", "0.25", "--shard-size", "10", "--min-shards", "2")


@pytest.fixture
def packed_copy(packed: Path, tmp_path: Path) -> Path:
    """A private, writable copy of `packed` (for tests that break shards or index files)."""
    dst = tmp_path / "shards"
    shutil.copytree(packed, dst)
    return dst


TRAINED_IMAGE_SIZE = 48  # the `packed` fixture's image side


@pytest.fixture(scope="session")
def trained(packed, tmp_path_factory) -> Path:
    """A run dir with best.safetensors of deepfakenet_tiny trained 4 epochs on packed/train.

    Trained with the real torch loader and saved with `save_checkpoint`; read-only for tests.
    """
    import torch

    from model import create_model
    from pipeline.checkpoint import save_checkpoint
    from pipeline.data.contract import LoaderSpec
    from pipeline.data.loader import build_loader

    torch.manual_seed(0)
    model = create_model("deepfakenet_tiny")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = build_loader(LoaderSpec(packed, "train", backend="torch", batch_size=16, image_size=TRAINED_IMAGE_SIZE, train=True,
                          aug="none", num_workers=0, seed=0))
    for epoch in range(4):
        loader.set_epoch(epoch)
        for batch in loader:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch.images).squeeze(1), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "best.safetensors", model.eval(), model_name="deepfakenet_tiny", image_size=TRAINED_IMAGE_SIZE,
                    extra={"epoch": 3})
    return run


@pytest.fixture(scope="session")
def s3_server():
    """moto's real S3 server on 127.0.0.1, a free port, for the whole session (tests/servers.py)."""
    from servers import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, tmp_path) -> str:
    """``s3://NAME`` of a fresh bucket on `s3_server`; the AWS_* environment points s3fs/botocore at it."""
    import uuid

    import s3fs

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    s3fs.S3FileSystem.clear_instance_cache()  # cached instances hold the previous test's environment
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def http_root(tmp_path) -> Tuple[Path, str]:
    """``(folder, base URL)``: a threaded http.server on 127.0.0.1 serving ``folder`` (tests/servers.py)."""
    from servers import http_server

    folder = tmp_path / "www"
    folder.mkdir()
    with http_server(folder) as base:
        yield folder, base
