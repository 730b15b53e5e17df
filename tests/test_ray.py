"""``deepfake-pack --ray`` and ``deepfake-faces --ray`` on a real local Ray (2 CPUs, one session for the module):
the same bytes as the single-machine pack for images, face videos and an S3 output; a worker killed mid-task is
retried and nothing is lost or doubled; a killed driver leaves nothing that looks whole and the same command
rebuilds; a leftover staging folder is cleaned, a foreign one refused; flag errors are one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from media_helpers import FACES, face_jpegs, face_rgb, scene, write_video
from ray_helpers import TaskWatcher, assert_same_output, manifest_without_run, tree_bytes
from servers import free_port

from helpers import make_image_dirs, write_image
from shard_tools import storage
from shard_tools.faces import main as faces_main
from shard_tools.pack import main as pack_main

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]
SHARDS = ["--shard-size", "4", "--min-shards", "2", "--val-fraction", "0.3"]
FACE = ["--faces", "--frames", "3", "--face-size", "64"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """2 real + 2 fake tiny face videos, a photo and an unreadable file: root/{real,fake}."""
    root = tmp_path_factory.mktemp("videos")
    for label, kind in (("real", "real"), ("fake", "fake")):
        (root / label).mkdir()
        for i, face in enumerate(face_jpegs(kind, 2)):
            f = face_rgb(face, 150)
            write_video(root / label / f"v{i}.mp4", [scene([f], seed=i, at=[(40 + 6 * k, 60 + 2 * k)]) for k in range(8)])
    write_image(root / "real" / "photo.jpg", scene([face_rgb(face_jpegs("real", 1, 6)[0], 140)], at=[(150, 70)]))
    (root / "fake" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40)
    return root


def _pack(out, real, fake, *extra) -> None:
    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", str(out), *SHARDS, *extra]) == 0


needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason="needs ../shared/data/faces")


def test_images_with_ray_are_byte_identical(ray_session, tmp_path):
    real, fake = make_image_dirs(tmp_path / "img", n_real=14, n_fake=12)
    _pack(tmp_path / "one", real, fake, "--workers", "1")
    _pack(tmp_path / "ray", real, fake, "--workers", "2", "--ray")
    assert_same_output(tmp_path / "one", tmp_path / "ray")
    m = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert m["args"]["ray"] == "local" and m["counts"]["real"]["kept"] == 14


@needs_faces
def test_face_stage_with_ray_is_byte_identical(ray_session, videos, tmp_path):
    _pack(tmp_path / "one", videos / "real", videos / "fake", *FACE, "--workers", "1")
    _pack(tmp_path / "ray", videos / "real", videos / "fake", *FACE, "--workers", "2", "--ray")
    assert_same_output(tmp_path / "one", tmp_path / "ray")
    m = manifest_without_run(tmp_path / "ray" / "manifest.json")
    assert m["faces"]["counts"]["real"]["videos"] == 2 and m["faces"]["counts"]["real"]["photos"] == 1
    assert [s["reason"] for s in m["skipped"]] == ["unreadable-video"]  # a bad input: skipped with its reason
    assert ray_workers_without_torch() >= 1  # the tasks import shard_tools only: no torch in any worker


def ray_workers_without_torch() -> int:
    """How many Ray worker processes of this test process there are; fails if one has libtorch loaded."""
    import psutil

    n = 0
    for p in psutil.Process().children(recursive=True):
        title = " ".join(p.cmdline())
        if title.startswith("ray::") and "Agent" not in title:
            libs = [m.path for m in p.memory_maps()]
            assert not [x for x in libs if "libtorch" in x], f"{title} (pid {p.pid}) has torch loaded"
            n += 1
    return n


@needs_faces
def test_deepfake_faces_with_ray_is_byte_identical(ray_session, videos, tmp_path):
    args = [str(videos), "--frames", "3", "--face-size", "64"]
    assert faces_main(args + ["--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert faces_main(args + ["--out", str(tmp_path / "ray"), "--ray"]) == 0
    a, b = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "ray")
    crops = [n for n in a if n.endswith(".jpg")]
    assert a == b and len(crops) == len(a["faces.jsonl"].splitlines()) >= 10


@needs_faces
def test_a_worker_killed_mid_task_is_retried(ray_session, videos, tmp_path):
    _pack(tmp_path / "one", videos / "real", videos / "fake", *FACE, "--workers", "1")
    killer = TaskWatcher(kills=2)
    killer.start()
    try:
        _pack(tmp_path / "ray", videos / "real", videos / "fake", *FACE, "--ray")
    finally:
        killed = killer.stop().killed
    assert killed, "no worker was caught running a task"
    assert_same_output(tmp_path / "one", tmp_path / "ray")  # nothing lost, nothing doubled, no temp file left


@needs_faces
def test_s3_output_with_ray_uploads_from_the_workers(ray_session, videos, s3_bucket, tmp_path, caplog):
    _pack(tmp_path / "one", videos / "real", videos / "fake", *FACE, "--workers", "1")
    url = f"{s3_bucket}/faces"
    storage.write_bytes(f"{url}/train-000042.tar", b"an old shard the new pack does not rewrite")
    storage.write_bytes(f"{url}/.deepfake-pack-staging/0123.jpg", b"a crop an interrupted run left")
    caplog.set_level("INFO")
    _pack(url, videos / "real", videos / "fake", *FACE, "--ray")
    uploads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("uploaded ")]
    assert uploads == [f"uploaded 1 files ({uploads[0].split('(')[1].split(')')[0]}) to {url}, manifest.json last"]
    names = storage.list_names(url)
    assert ".deepfake-pack-staging" not in names and "train-000042.tar" not in names
    got = tmp_path / "got"
    for name in names:
        storage.download_verified(f"{url}/{name}", got)
    assert_same_output(tmp_path / "one", got)
    assert json.loads((got / "manifest.json").read_text())["args"]["out"] == url


@needs_faces
def test_a_leftover_staging_folder_is_cleaned_and_a_foreign_one_refused(ray_session, videos, tmp_path):
    _pack(tmp_path / "one", videos / "real", videos / "fake", *FACE, "--workers", "1")
    out = tmp_path / "ray"
    (out / ".deepfake-pack-staging").mkdir(parents=True)
    (out / ".deepfake-pack-staging" / "owner.json").write_text('{"tool": "deepfake-pack"}')
    (out / ".deepfake-pack-staging" / "ab.jpg.123.tmp").write_bytes(b"half a crop")  # an interrupted run's
    _pack(out, videos / "real", videos / "fake", *FACE, "--ray")
    assert_same_output(tmp_path / "one", out)
    foreign = tmp_path / "foreign"
    (foreign / ".deepfake-pack-staging").mkdir(parents=True)
    (foreign / ".deepfake-pack-staging" / "notes.txt").write_text("mine")
    assert pack_main(["--real", str(videos / "real"), "--fake", str(videos / "fake"), "--out", str(foreign),
                      *FACE, "--ray"]) == 2
    assert (foreign / ".deepfake-pack-staging" / "notes.txt").read_text() == "mine"


def test_a_task_error_comes_back_as_itself(ray_session, s3_bucket):
    from shard_tools.pools import RayPool

    with RayPool("local", 2) as pool:  # the module's Ray: its workers see the S3 server
        with pytest.raises(storage.StorageError) as e:
            list(pool.imap(storage.read_bytes, [f"{s3_bucket}/nothing.bin"]))
    assert e.value.kind == "not-found" and str(e.value).startswith(f"{s3_bucket}/nothing.bin: ")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "shard_tools.pack", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)


def test_ray_flag_errors_are_one_line(tmp_path):
    real, fake = make_image_dirs(tmp_path / "img", n_real=2, n_fake=2)
    common = ["--real", str(real), "--fake", str(fake), "--out", str(tmp_path / "out")]
    r = _cli(*common, "--ray", f"127.0.0.1:{free_port()}")  # nothing listens there: fails in seconds, no hang
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert r.returncode == 1 and len(errors) == 1 and "nothing answers at 127.0.0.1" in errors[0], r.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        pack_main([*common, "--ray", str(real)])
    assert e.value.code == 2


def test_without_ray_installed_it_says_how(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees where Ray is not installed
    real, fake = make_image_dirs(tmp_path / "img", n_real=2, n_fake=2)
    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", str(tmp_path / "out"), "--ray"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and 'pip install -e ".[ray]"' in errors[0]


@needs_faces
def test_a_killed_driver_leaves_nothing_whole_and_the_rerun_rebuilds(ray_session, videos, tmp_path):
    _pack(tmp_path / "one", videos / "real", videos / "fake", *FACE, "--workers", "1")
    out = tmp_path / "ray"
    argv = ["--real", str(videos / "real"), "--fake", str(videos / "fake"), "--out", str(out), *SHARDS, *FACE, "--ray"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_memory_monitor_refresh_ms": "0"}
    driver = subprocess.Popen([sys.executable, "-m", "shard_tools.pack", *argv], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = out / ".deepfake-pack-staging"
    try:
        for _ in range(2400):  # until the face tasks have staged crops (its own Ray takes a few seconds to start)
            if driver.poll() is not None or (staging.is_dir() and len(list(staging.glob("*.jpg"))) >= 2):
                break
            time.sleep(0.05)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, "the pack finished before it could be killed"
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))  # nothing that looks whole
    assert pack_main(argv) == 0  # the same command: cleans the staged crops and the lock, rebuilds
    assert_same_output(tmp_path / "one", out)
