"""Pack outputs at URLs against hostile or failing stores (issue 23), on real servers on 127.0.0.1 only
(moto's S3 server, http.server: tests/servers.py): one writer per prefix, manifests validated before any
URL is built from them, transient failures retried, every failure one line. No mocks."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_image_dirs
from servers import free_port

from shard_tools import storage
from shard_tools.format import MANIFEST
from shard_tools.inputs import InputError
from shard_tools.inspect import main as inspect_main
from shard_tools.pack import main as pack_main
from shard_tools.remote_lock import RemoteLock

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]
LOCK = ".deepfake-pack.lock"
FAST = {"connect_timeout": 2, "read_timeout": 5, "attempts": 2}


def _errors(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _one_error(caplog) -> str:
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in errors[0], errors
    return errors[0]


def _upload(folder: Path, url: str) -> None:
    storage.upload_folder(folder, url, sorted(p.name for p in folder.iterdir() if p.is_file()), workers=4)


def _objects(url: str) -> dict:
    return {n: storage.read_bytes(storage.join(url, n)) for n in storage.list_names(url)}


# -- one writer per prefix --------------------------------------------------------------------------
_WRITER = """
import os, sys, time
sys.path.insert(0, {repo!r})
import s3fs  # everything imported before the start signal, so both packs reach the lock together
from shard_tools.pack import main
open(sys.argv[1] + ".ready", "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.005)
sys.exit(main(sys.argv[3:]))
"""


def test_remote_pack_lock_two_writers(s3_bucket, tmp_path):
    """Two packs started at the same moment on one s3:// prefix: one refuses, the other's output verifies."""
    url = f"{s3_bucket}/faces"
    go = tmp_path / "go"
    procs, inputs = [], []
    for i in range(2):
        real, fake = make_image_dirs(tmp_path / f"in{i}", n_real=30, n_fake=30, seed=10 + i)
        inputs.append(str(real))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _WRITER.format(repo=str(REPO)), str(tmp_path / f"w{i}"), str(go),
             "--real", str(real), "--fake", str(fake), "--out", url, "--workers", "1", "--shard-size", "10"],
            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 120
    while not all((tmp_path / f"w{i}.ready").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()
    results = [(p.wait(timeout=240), p.communicate()[1]) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    last = [ln for ln in loser.splitlines() if ln.strip()][-1]
    assert "is being written by another deepfake-pack" in last and "Traceback" not in loser, loser
    winner = next(i for i, (rc, _) in enumerate(results) if rc == 0)
    manifest = storage.read_json(storage.join(url, MANIFEST))
    assert manifest["inputs"]["real"] == [inputs[winner]]  # the survivor's output, whole
    assert LOCK not in storage.list_names(url)
    assert inspect_main([url, "--verify"]) == 0


def test_remote_lock_lost_stops_before_the_manifest(s3_bucket, packed):
    """A lock deleted and taken by another writer during the upload: the manifest is never written."""
    url = f"{s3_bucket}/lost"
    with RemoteLock(url) as lock:
        storage.remove_object(storage.join(url, LOCK))
        with RemoteLock(url):  # the other writer
            files = sorted(p.name for p in packed.iterdir() if p.is_file())
            with pytest.raises(InputError, match="lost its lock .* stopped before writing manifest.json"):
                storage.upload_folder(packed, url, files, before_last=lock.check)
        assert MANIFEST not in storage.list_names(url)


def test_remote_lock_of_a_killed_pack(s3_bucket, image_dirs, caplog):
    """A lock left by a pack that died on this host is taken over; one from another host is refused by name."""
    url = f"{s3_bucket}/stale"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    for host, pid, ok in ((socket.gethostname(), dead.pid, True), ("other-host", 1, False)):
        storage.write_bytes(storage.join(url, LOCK), json.dumps(
            {"tool": "deepfake-pack", "token": "x", "host": host, "pid": pid, "started": "then"}).encode())
        caplog.clear()
        real, fake = image_dirs
        rc = pack_main(["--real", str(real), "--fake", str(fake), "--out", url, "--workers", "1", "--overwrite"])
        if ok:
            assert rc == 0 and "which has exited" in caplog.text and LOCK not in storage.list_names(url)
        else:
            assert rc == 2
            msg = _one_error(caplog)
            assert "being written by another deepfake-pack (host other-host, pid 1" in msg
            assert f"delete {url}/{LOCK}" in msg


def test_remote_foreign_manifest_never_overwritten(s3_bucket, image_dirs, caplog):
    """A manifest.json that deepfake-pack did not write is refused, with or without --overwrite (as locally)."""
    url = f"{s3_bucket}/theirs"
    storage.write_bytes(storage.join(url, MANIFEST), b'{"tool": "someone-else", "files": ["a.bin"]}')
    storage.write_bytes(storage.join(url, "train-000000.tar"), b"not ours")
    before = _objects(url)
    real, fake = image_dirs
    for extra in ([], ["--overwrite"]):
        caplog.clear()
        assert pack_main(["--real", str(real), "--fake", str(fake), "--out", url, "--workers", "1", *extra]) == 2
        assert "is not a deepfake-pack manifest" in _one_error(caplog)
        assert _objects(url) == before


def test_remote_pack_refuses_a_store_without_exclusive_create(tmp_path, image_dirs, caplog):
    real, fake = image_dirs
    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", "memory://bucket/p", "--workers", "1"]) == 2
    assert "offers no atomic create-if-absent" in _one_error(caplog)


# -- untrusted manifests: validated before any URL is built from them ---------------------------------
@pytest.mark.parametrize("name", ["../../secret.txt", "..", "a/b.tar", "x?y.tar", "%2e%2e%2fsecret.txt", "t\u0000.tar"])
def test_remote_inspect_validates_names_before_fetching(http_root, packed, caplog, name):
    folder, base = http_root
    (folder / "secret.txt").write_text("not a shard")
    pack = folder / "a" / "b" / "p"
    shutil.copytree(packed, pack)
    manifest = json.loads((pack / MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][1]["name"] = name
    (pack / MANIFEST).write_text(json.dumps(manifest))
    caplog.set_level(logging.DEBUG, logger="servers")
    assert inspect_main([f"{base}/a/b/p", "--verify"]) == 2
    assert "nothing was downloaded" in _one_error(caplog)
    asked = [r.getMessage() for r in caplog.records if r.name == "servers"]
    assert asked and all("/a/b/p/manifest.json" in line for line in asked), asked


@pytest.mark.timeout(60)
def test_remote_inspect_file_url_cannot_copy_outside_the_prefix(packed, tmp_path, caplog):
    """A file:// name that leaves the prefix is refused before anything is opened: the FIFO it names would
    block the first read of it (the old order fetched every listed name first, then validated)."""
    pack = tmp_path / "p"
    shutil.copytree(packed, pack)
    os.mkfifo(tmp_path / "outside")
    manifest = json.loads((pack / MANIFEST).read_text())
    manifest["splits"]["val"]["shards"][0]["index"] = "../outside"
    (pack / MANIFEST).write_text(json.dumps(manifest))
    assert inspect_main([f"file://{pack}", "--verify"]) == 2
    msg = _one_error(caplog)
    assert "'index'" in msg and "../outside" in msg and "nothing was downloaded" in msg


def test_remote_inspect_bounds_the_shard_count(http_root, packed, caplog, monkeypatch):
    from shard_tools import remote

    monkeypatch.setattr(remote, "MAX_SHARDS", 5)  # the packed fixture lists 9
    folder, base = http_root
    shutil.copytree(packed, folder / "p")
    caplog.set_level(logging.DEBUG, logger="servers")
    assert inspect_main([f"{base}/p", "--verify"]) == 2
    assert "more than 5 shards" in _one_error(caplog)
    assert not [r for r in caplog.records if r.name == "servers" and ".tar" in r.getMessage()]


def test_remote_inspect_nested_manifest_is_one_line(s3_bucket, caplog):
    url = f"{s3_bucket}/nested"
    storage.write_bytes(storage.join(url, MANIFEST), b"[" * 100_000 + b"]" * 100_000)
    assert inspect_main([url]) == 2
    assert "nested too deeply" in _one_error(caplog)


# -- failing servers -----------------------------------------------------------------------------------
def test_http_transient_500_is_retried(http_root, packed):
    """Each object's first GET answers 500: reads retry with back-off (manifest, downloads and streams)."""
    from pipeline.data.contract import LoaderSpec
    from pipeline.data.loader import build_loader

    folder, base = http_root
    shutil.copytree(packed, folder / "p")
    shutil.copytree(packed, folder / "q")
    assert inspect_main([f"{base}/flaky/p", "--verify"]) == 0
    loader = build_loader(LoaderSpec(f"{base}/flaky/q", "train", train=False, backend="torch", batch_size=8,
                                     image_size=32, num_workers=0))
    ids = [i for batch in loader for i in batch.ids]
    assert len(set(ids)) == loader.split_samples


def test_http_server_error_names_the_shard_after_its_attempts(http_root, packed):
    from pipeline.data.contract import LoaderSpec
    from pipeline.data.loader import build_loader
    from pipeline.data.shards import DataError

    folder, base = http_root
    shutil.copytree(packed, folder / "p")
    loader = build_loader(LoaderSpec(f"{base}/tars500/p", "train", train=False, backend="torch", batch_size=8,
                                     image_size=32, num_workers=0, storage_options=FAST))
    with pytest.raises(DataError) as e:
        list(loader)
    msg = str(e.value)
    assert "\n" not in msg and "tars500/p/" in msg and ".tar" in msg and "HTTP 500" in msg and "tried 2 times" in msg


def test_http_redirect_loop_is_named(http_root, packed, caplog):
    folder, base = http_root
    shutil.copytree(packed, folder / "p")
    assert inspect_main([f"{base}/loop/p", "--storage-options", json.dumps(FAST)]) == 2
    msg = _one_error(caplog)
    assert "redirects in a loop" in msg and "is missing" not in msg


@pytest.mark.parametrize("options, expect", [
    ('{"attempts": NaN}', "attempts must be a positive number, got nan"),
    ('{"read_timeout": Infinity}', "read_timeout must be a positive number, got inf"),
    ('{"attempts": 2.5}', "attempts must be a whole number"),
])
def test_storage_options_non_finite_are_usage_errors(options, expect, capsys):
    with pytest.raises(SystemExit) as e:
        inspect_main(["s3://bucket/p", "--storage-options", options])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expect in err and "Traceback" not in err


@pytest.mark.parametrize("scheme", ["s3", "http"])
def test_storage_options_unknown_key_is_one_line(s3_bucket, http_root, packed, caplog, scheme):
    folder, base = http_root
    url = f"{s3_bucket}/k" if scheme == "s3" else f"{base}/k"
    assert inspect_main([url, "--storage-options", '{"bogus_option": 1}']) == 2
    msg = _one_error(caplog)
    assert "--storage-options key 'bogus_option' is not an option of" in msg and "unexpected keyword" not in msg


def test_unreachable_ftp_is_one_line(caplog):
    assert inspect_main([f"ftp://127.0.0.1:{free_port()}/x"]) == 2
    assert "cannot reach the server" in _one_error(caplog)


# -- temp folders of killed runs -----------------------------------------------------------------------
def test_temp_folders_of_killed_runs_are_removed(s3_bucket, image_dirs, tmp_path, monkeypatch):
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches the folder it chose
    holder = ("import sys, time; sys.path.insert(0, {repo!r}); from shard_tools.fsutil import owned_tempdir\n"
              "with owned_tempdir(sys.argv[1]) as d:\n    (d / 'big').write_bytes(b'x' * 1000); print(d, flush=True); "
              "time.sleep(600)\n").format(repo=str(REPO))
    procs = {}
    for prefix in ("deepfake-pack-", "deepfake-inspect-"):
        for fate in ("killed", "alive"):
            p = subprocess.Popen([sys.executable, "-c", holder, prefix], stdout=subprocess.PIPE, text=True,
                                 env=dict(os.environ))
            procs[prefix, fate] = (p, Path(p.stdout.readline().strip()))
    try:
        for prefix in ("deepfake-pack-", "deepfake-inspect-"):
            procs[prefix, "killed"][0].send_signal(signal.SIGKILL)
            procs[prefix, "killed"][0].wait()
        real, fake = image_dirs
        url = f"{s3_bucket}/t"
        assert pack_main(["--real", str(real), "--fake", str(fake), "--out", url, "--workers", "1"]) == 0
        assert inspect_main([url, "--verify"]) == 0
        for (prefix, fate), (p, folder) in procs.items():
            assert folder.exists() == (fate == "alive"), (prefix, fate)
        assert sorted(tmp.iterdir()) == sorted(folder for (_, fate), (_, folder) in procs.items() if fate == "alive")
    finally:
        for p, _ in procs.values():
            p.kill()
            p.wait()
