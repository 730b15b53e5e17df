"""Training and its data at the edges (issue 23): a resumed run reads the pack it began on, one run per
folder, shards checked by content (cached, local and streamed), no credential ever written, and one line
for malformed input and exhausted resources. Real shards, real servers on 127.0.0.1, real processes."""
from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_image_dirs, one_error, pack_dirs, write_image

from pipeline import evaluate, train
from pipeline.data.contract import LoaderSpec
from pipeline.data.loader import build_loader
from pipeline.data.shards import DataError
from shard_tools import fsutil, storage
from shard_tools.format import MANIFEST

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("fresh_accelerate_state")]
REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "deepfakenet_tiny", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--cpu",
        "--backend", "torch", "--seed", "0"]
BASE = ["--model", "deepfakenet_tiny", "--batch-size", "8", "--cpu", "--backend", "torch"]
SECRET = "sEcReT-value-7d41c0e9b2"


def _epoch_ids(data: str, **kw) -> list:
    loader = build_loader(LoaderSpec(data, "train", train=False, backend="torch", batch_size=8, image_size=32,
                                     num_workers=0, **kw))
    return [i for batch in loader for i in batch.ids]


def _swap(pack: Path, src: str = "train-000000.tar", dst: str = "train-000001.tar") -> None:
    """Copy one shard over another of the same pack with the same sample count and size (a valid shard, the
    wrong one): only the bytes against the manifest's SHA-256 can tell."""
    manifest = json.loads((pack / MANIFEST).read_text())
    entries = {e["name"]: e for e in manifest["splits"]["train"]["shards"]}
    assert (entries[src]["num_samples"], entries[src]["bytes"]) == (entries[dst]["num_samples"], entries[dst]["bytes"])
    shutil.copyfile(pack / src, pack / dst)


class _Stop(Exception):
    pass


def _stopped_run(data: Path, run: Path, *extra: str) -> None:
    """A run of 2 epochs stopped during epoch 2, the state of epoch 1 saved."""
    def stop(epoch, step):
        if epoch == 2:
            raise _Stop()
    with pytest.raises(_Stop):
        train.main(["--data", str(data), "--out", str(run), *TINY, "--epochs", "2", "--max-steps", "1", *extra],
                   on_step=stop)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# -- item 3: --resume on another pack ----------------------------------------------------------------
def test_resume_refuses_other_pack(tmp_path, caplog):
    real, fake = make_image_dirs(tmp_path / "in", n_real=24, n_fake=24)
    data = pack_dirs(real, fake, tmp_path / "pack", "--min-shards", "1")
    run = tmp_path / "run"
    _stopped_run(data, run)
    before = json.loads((run / "config.json").read_text())["pack"]
    assert before["train"] and before["val"]
    pack_dirs(real, fake, data, "--min-shards", "1", "--overwrite", "--seed", "1")  # the same folder, another split
    now = build_loader(LoaderSpec(str(data), "train", train=True, backend="torch", batch_size=8, image_size=32,
                                  num_workers=0)).shardset.fingerprint
    caplog.clear()
    assert train.main(["--data", str(data), "--out", str(run), *TINY, "--epochs", "2", "--max-steps", "1",
                       "--resume"]) == 2
    msg = one_error(caplog)
    assert "--resume:" in msg and before["train"][:16] in msg and now[:16] in msg and "the pack changed" in msg
    # the pack it began on: resuming works
    pack_dirs(real, fake, data, "--min-shards", "1", "--overwrite", "--seed", "0")
    assert train.main(["--data", str(data), "--out", str(run), *TINY, "--epochs", "2", "--max-steps", "1",
                       "--resume"]) == 0


# -- one run per folder --------------------------------------------------------------------------------
def test_train_run_lock_two_writers(packed, tmp_path, caplog):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, {repo!r}); from pathlib import Path\n"
        "from shard_tools.outdir import OutputLock\n"
        "with OutputLock(Path(sys.argv[1]), name='.deepfake-train.lock', tool='deepfake-train'):\n"
        "    print('held', flush=True); time.sleep(600)\n").format(repo=str(REPO)), str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in (["--resume"], []):
            caplog.clear()
            assert train.main(["--data", str(packed), "--out", str(run), *TINY, "--epochs", "1", "--max-steps", "1",
                               *extra]) == 2
            assert f"--out {run} is being written by another deepfake-train (pid {holder.pid})" in one_error(caplog)
        assert sorted(p.name for p in run.iterdir()) == [".deepfake-train.lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    caplog.clear()
    assert train.main(["--data", str(packed), "--out", str(run), *TINY, "--epochs", "1", "--max-steps", "1"]) == 0
    assert not (run / ".deepfake-train.lock").exists()  # a killed holder's lock file is no obstacle


# -- item 2 and shards checked by content ----------------------------------------------------------------
def test_cache_poisoned_shard_detected(packed, s3_bucket, tmp_path, caplog):
    """A cached shard replaced by another of the same size is downloaded again, not trained on; with
    --verify-data a copy whose record still vouches for it (bit rot keeps mtime and ctime) is re-hashed."""
    from pipeline.data.shards import cache_name

    url = f"{s3_bucket}/faces"
    storage.upload_folder(packed, url, sorted(p.name for p in packed.iterdir() if p.is_file()), workers=4)
    cache = tmp_path / "cache"
    first = _epoch_ids(url, cache_dir=str(cache))
    assert len(set(first)) == len(first) == 62
    a, b = (cache / cache_name(storage.join(url, n)) for n in ("train-000000.tar", "train-000001.tar"))
    shutil.copyfile(a, b)
    caplog.set_level(logging.WARNING)
    again = _epoch_ids(url, cache_dir=str(cache))
    assert sorted(again) == sorted(first)  # no duplicates: the poisoned copy was replaced
    assert "does not match the manifest's SHA-256" in caplog.text and b.read_bytes() == (packed / "train-000001.tar").read_bytes()
    from shard_tools.inspect import main as inspect_main

    caplog.set_level(logging.INFO)
    assert inspect_main([url, "--verify"]) == 0  # its OK is about what it downloaded, not about a cache
    assert "a --cache-dir of train or evaluate was not read" in caplog.text
    shutil.copyfile(a, b)
    want = json.loads((packed / MANIFEST).read_text())["splits"]["train"]["shards"][1]["sha256"]
    fsutil.remember_sha256(b, want)  # the record now lies about the file
    assert train.main(["--data", url, "--out", str(tmp_path / "run"), *TINY, "--epochs", "1", "--max-steps", "1",
                       "--cache-dir", str(cache), "--verify-data"]) == 0
    assert b.read_bytes() == (packed / "train-000001.tar").read_bytes()


def test_local_shard_replaced_by_another_of_the_pack(packed_copy):
    """Train used to check each shard's sample count only: a same-count, same-size shard trained as duplicates."""
    assert len(set(_epoch_ids(str(packed_copy)))) == 62
    _swap(packed_copy)
    with pytest.raises(DataError, match="train-000001.tar: its SHA-256 differs from the manifest's"):
        _epoch_ids(str(packed_copy))


def test_streamed_shard_replaced_by_another_of_the_pack(packed, s3_bucket, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(packed, swapped)
    _swap(swapped)
    url = f"{s3_bucket}/swapped"
    storage.upload_folder(swapped, url, sorted(p.name for p in swapped.iterdir() if p.is_file()), workers=4)
    with pytest.raises(DataError, match="train-000001.tar: its SHA-256 differs from the manifest's"):
        _epoch_ids(url)


@pytest.mark.parametrize("what", ["file", "folder-at-shard"])
def test_cache_dir_that_is_not_a_folder(packed, s3_bucket, tmp_path, caplog, what):
    from pipeline.data.shards import cache_name

    url = f"{s3_bucket}/c"
    storage.upload_folder(packed, url, sorted(p.name for p in packed.iterdir() if p.is_file()), workers=4)
    cache = tmp_path / "cache"
    if what == "file":
        cache.write_text("x")
        expect = f"--cache-dir {cache}: is a file, not a folder"
    else:
        (cache / cache_name(storage.join(url, "train-000000.tar"))).mkdir(parents=True)
        expect = "is not a regular file (a folder?) where the downloaded copy of"
    assert train.main(["--data", url, "--out", str(tmp_path / "run"), *TINY, "--epochs", "1", "--max-steps", "1",
                       "--cache-dir", str(cache)]) == 2
    assert expect in one_error(caplog)


# -- item 5: no secret written anywhere ------------------------------------------------------------------
def _files_holding(secret: str, *roots: Path) -> list:
    hits = []
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file() and secret.encode() in p.read_bytes():
                hits.append(str(p))
    return hits


def test_secret_never_written(image_dirs, s3_bucket, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    opts = json.dumps({"key": "testing", "secret": SECRET, "attempts": 2})
    url = f"{s3_bucket}/secret"
    real, fake = image_dirs
    from shard_tools.pack import main as pack_main
    from shard_tools.inspect import main as inspect_main

    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", url, "--workers", "1", "--min-shards", "1",
                      "--storage-options", opts]) == 0
    local = tmp_path / "file-pack"
    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", f"file://{local}", "--workers", "1",
                      "--min-shards", "1", "--storage-options", opts]) == 0
    assert inspect_main([url, "--verify", "--storage-options", opts]) == 0
    run, ev, cache = tmp_path / "run", tmp_path / "eval", tmp_path / "cache"
    assert train.main(["--data", url, "--out", str(run), *TINY, "--epochs", "1", "--max-steps", "1",
                       "--storage-options", opts, "--cache-dir", str(cache)]) == 0
    assert (run / "config.json").exists() and (run / "best.safetensors").exists() and list((run / "tb").iterdir())
    assert evaluate.main(["--checkpoint", str(run), "--data", url, "--device", "cpu", "--workers", "0", "--out", str(ev),
                          "--storage-options", opts]) == 0
    from pipeline.bench import main as bench_main

    bench_json = tmp_path / "bench.json"
    assert bench_main(["--data", str(local), "--rows", "read",
                       "--remote-data", url, "--storage-options", opts, "--json", str(bench_json)]) in (0, 1)
    for bad in ('{"secret": "%s", "attempts": 0}' % SECRET, '{"secret": "%s"' % SECRET):
        with pytest.raises(SystemExit):
            inspect_main([url, "--storage-options", bad])
    objects = tmp_path / "objects"
    objects.mkdir()
    for name in storage.list_names(url):
        (objects / name).write_bytes(storage.read_bytes(storage.join(url, name)))
    config = json.loads((run / "config.json").read_text())
    assert config["storage_options"] == ["attempts", "key", "secret"]  # the names are recorded
    assert _files_holding(SECRET, tmp_path) == []  # run, evaluation, cache, both packs, bench JSON
    out, err = capsys.readouterr()
    assert SECRET not in caplog.text and SECRET not in out and SECRET not in err


# -- item 6: malformed input and exhausted resources, one line each ------------------------------------
@pytest.mark.parametrize("how", ["nested", "nul-name", "nul-index"])
def test_malformed_manifest_is_one_line(packed_copy, tmp_path, caplog, how):
    from shard_tools.inspect import main as inspect_main

    path = packed_copy / MANIFEST
    manifest = json.loads(path.read_text())
    if how == "nested":
        path.write_text("[" * 100_000 + "]" * 100_000)
        expect = "nested too deeply"
    else:
        manifest["splits"]["train"]["shards"][0]["name" if how == "nul-name" else "index"] = "train-000000\u0000.tar"
        path.write_text(json.dumps(manifest))
        expect = "is not a plain file name"
    assert train.main(["--data", str(packed_copy), "--out", str(tmp_path / "run"), *TINY, "--epochs", "1"]) == 2
    assert expect in one_error(caplog) and "embedded null byte" not in caplog.text
    caplog.clear()
    assert inspect_main([str(packed_copy), "--verify"]) == 2
    msg = one_error(caplog)
    assert "is not a deepfake-pack manifest" in msg


def _run_limited(args, *, fsize=None, address_space=None, timeout=240) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if fsize:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if address_space:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return subprocess.run([sys.executable, "-m", *args], env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit, cwd=REPO)


def _last_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = re.findall(r"error: [^\r\n]*", proc.stderr)  # a progress bar may precede it on its line
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_shared_memory_slabs_under_a_file_size_limit(packed, tmp_path):
    """The workers' shared-memory batches are files in /dev/shm: `ulimit -f` stops them (was a torch traceback)."""
    proc = _run_limited(["pipeline.train", "--data", str(packed), "--out", str(tmp_path / "run"), *BASE,
                         "--image-size", "96", "--workers", "2", "--epochs", "1", "--max-steps", "1"],
                        fsize=1_000_000)
    assert proc.returncode == 2
    msg = _last_line(proc)
    assert "cannot allocate the loader's 6 shared-memory batches of 8x96x96x3" in msg and "ulimit -f" in msg


def test_huge_crops_under_a_memory_limit(packed, tmp_path):
    """--preprocess crop --image-size 4096 under a memory cap: one line naming the sizes (was the allocator's)."""
    proc = _run_limited(["pipeline.train", "--data", str(packed), "--out", str(tmp_path / "run"), *BASE,
                         "--image-size", "4096", "--preprocess", "crop", "--workers", "0", "--epochs", "1",
                         "--max-steps", "1"], address_space=6 * 2**30)
    assert proc.returncode == 2
    msg = _last_line(proc)
    assert "--batch-size" in msg and "--image-size" in msg and ("memory" in msg)


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_scoring_out_of_memory_is_one_line(tmp_path, command):
    """deepfakenet_base scoring 8 images of 2048 x 2048 at a time at native resolution (--scoring full) under
    a 6 GiB address-space cap (it needs ~12): one line naming --batch-size (was the allocator's traceback), and
    nothing written."""
    import numpy as np

    from model import create_model
    from pipeline.checkpoint import save_checkpoint

    ckpt = tmp_path / "base.safetensors"
    save_checkpoint(ckpt, create_model("deepfakenet_base").eval(), model_name="deepfakenet_base", image_size=48,
                    extra={"epoch": 0})
    ramp = np.linspace(0, 255, 2048, dtype=np.float32)
    first = write_image(tmp_path / "big.jpg", np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1).astype(np.uint8))
    for kind in ("real", "fake"):
        (tmp_path / kind).mkdir()
        for i in range(8):
            os.link(first, tmp_path / kind / f"{kind}{i}.jpg")
    args = (["pipeline.evaluate", "--checkpoint", str(ckpt), "--real", str(tmp_path / "real"), "--fake",
             str(tmp_path / "fake"), "--out", str(tmp_path / "eval")] if command == "evaluate" else
            ["pipeline.predict", "--checkpoint", str(ckpt), str(tmp_path / "real"), "--out", str(tmp_path / "p.csv")])
    proc = _run_limited(args + ["--scoring", "full", "--batch-size", "8", "--workers", "0"], address_space=6 * 2**30)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = re.findall(rf"{command}: out of [^\r\n]*", proc.stderr)
    assert len(lines) == 1 and "with --batch-size 8: lower --batch-size" in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "eval").exists() and not (tmp_path / "p.csv").exists()


def test_sbi_only_on_a_pack_without_reals(tmp_path, caplog):
    _, fake = make_image_dirs(tmp_path / "in", n_real=0, n_fake=24)
    from shard_tools.pack import main as pack_main

    data = tmp_path / "pack"
    assert pack_main(["--fake", str(fake), "--out", str(data), "--workers", "1", "--min-shards", "1"]) == 0
    assert train.main(["--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--epochs", "1",
                       "--fakes", "sbi-only", "--self-blend", "0.5"]) == 2
    msg = one_error(caplog)
    assert "--fakes sbi-only trains on the real images of the 'train' split; it has none" in msg
    assert "--batch-size" not in msg
