"""Shared fixtures: tiny real JPEG files, real packed shards, a trained checkpoint, real servers on
127.0.0.1 (no mocks of torch/DALI/webdataset/fsspec). Helper functions are in tests/helpers.py."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Tuple

import pytest
from helpers import make_image_dirs, pack_dirs

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_cache_root(tmp_path_factory):
    """The tools' cache folder (`shard_tools.fsutil.cache_root`: SHA-256 records, DALI downloads) in a temp
    folder for the session, never the user's ~/.cache; subprocesses inherit it."""
    old = os.environ.get("DEEPFAKE_CACHE_DIR")
    os.environ["DEEPFAKE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache-root"))
    yield
    if old is None:
        os.environ.pop("DEEPFAKE_CACHE_DIR", None)
    else:
        os.environ["DEEPFAKE_CACHE_DIR"] = old


@pytest.fixture
def image_dirs(tmp_path: Path) -> Tuple[Path, Path]:
    """12 real + 12 fake 32x32 JPEGs in tmp_path/{real,fake}."""
    return make_image_dirs(tmp_path / "images")




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


@pytest.fixture(scope="module")
def ray_session(s3_server):
    """One local Ray with 2 CPUs for a module; its workers see the S3 server through the environment, as the
    workers of a run's own local Ray would (credentials come from each node's environment)."""
    ray = pytest.importorskip("ray")
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    quiet = {"RAY_memory_monitor_refresh_ms": "0"}  # the shared test machine sits near Ray's 95 % memory line
    env = {**aws, **quiet, "AWS_ENDPOINT_URL": s3_server.endpoint, "NO_PROXY": "127.0.0.1,localhost"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    yield ray
    ray.shutdown()


@pytest.fixture
def http_root(tmp_path) -> Tuple[Path, str]:
    """``(folder, base URL)``: a threaded http.server on 127.0.0.1 serving ``folder`` (tests/servers.py)."""
    from servers import http_server

    folder = tmp_path / "www"
    folder.mkdir()
    with http_server(folder) as base:
        yield folder, base


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process training run builds its own Accelerator; forget the previous one's singleton state
    (``pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`` in the modules that train)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
