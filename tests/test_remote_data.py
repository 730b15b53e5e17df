"""Training and evaluation from pack outputs on object storage, against real servers on 127.0.0.1:
moto's S3 server and an http.server (tests/servers.py). No mocks of fsspec, s3fs, webdataset, botocore.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from servers import free_port

from pipeline import evaluate
from pipeline.data.contract import LoaderSpec
from pipeline.data.loader import build_loader
from pipeline.data.shards import DataError
from shard_tools import storage

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]
TIMINGS = {"img_s", "data_wait_s", "compute_s", "val_s"}
TINY = ["--model", "deepfakenet_tiny", "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--seed", "0"]


def _upload(packed: Path, url: str) -> None:
    storage.upload_folder(packed, url, sorted(p.name for p in packed.iterdir() if p.is_file()), workers=4)


def _eval(tmp_path: Path, name: str, checkpoint: Path, data: str, *extra: str) -> dict:
    out = tmp_path / name
    assert evaluate.main(["--checkpoint", str(checkpoint), "--data", data, "--split", "val", "--device", "cpu",
                          "--workers", "0", "--out", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())["metrics"]


def _scores(tmp_path: Path, name: str) -> list:
    """(id, label, score) rows: remote shards give no per-sample source path (read from local tars only)."""
    with open(tmp_path / name / "scores.csv", newline="") as f:
        return sorted((r["id"], r["label"], r["score"]) for r in csv.DictReader(f))


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_evaluate_from_s3_matches_local(packed, trained, s3_bucket, tmp_path, backend):
    url = f"{s3_bucket}/faces"
    _upload(packed, url)
    extra = ["--backend", backend, "--cache-dir", str(tmp_path / "cache")]
    local = _eval(tmp_path, "local", trained, str(packed), *extra)
    remote = _eval(tmp_path, "s3", trained, url, *extra)
    assert remote == local
    assert _scores(tmp_path, "s3") == _scores(tmp_path, "local")


def test_evaluate_from_http_matches_local(packed, trained, http_root, tmp_path):
    folder, base = http_root
    shutil.copytree(packed, folder / "faces")
    local = _eval(tmp_path, "local", trained, str(packed), "--backend", "torch")
    remote = _eval(tmp_path, "http", trained, f"{base}/faces", "--backend", "torch")  # streamed, no cache
    assert remote == local


def test_train_from_s3_with_cache_matches_local(packed, s3_bucket, tmp_path):
    from accelerate.state import AcceleratorState

    from pipeline.train import main as train_main

    url = f"{s3_bucket}/faces"
    _upload(packed, url)
    cache = tmp_path / "cache"
    rows = {}
    for name, data, extra in (("local", str(packed), []), ("s3", url, ["--cache-dir", str(cache)])):
        AcceleratorState._reset_state(reset_partial_state=True)
        out = tmp_path / name
        assert train_main(["--data", data, "--out", str(out), "--cpu", "--backend", "torch", "--workers", "0",
                           *TINY, *extra]) == 0
        with open(out / "metrics.csv", newline="") as f:
            rows[name] = [{k: v for k, v in r.items() if k not in TIMINGS} for r in csv.DictReader(f)]
    AcceleratorState._reset_state(reset_partial_state=True)
    assert rows["s3"] == rows["local"] and len(rows["s3"]) == 2  # same losses and metrics (timings differ)
    cached = sorted(p.name for p in cache.iterdir())
    names = [e["name"] for s in json.loads((packed / "manifest.json").read_text())["splits"].values() for e in s["shards"]]
    assert len(cached) == len(names) and not [n for n in cached if n.startswith(".tmp-")]


def test_two_processes_from_s3(packed, s3_bucket, tmp_path):
    url = f"{s3_bucket}/faces"
    _upload(packed, url)
    out = tmp_path / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(REPO / "pipeline" / "train.py"),
           "--data", url, "--out", str(out), "--cpu", "--backend", "torch", "--workers", "1", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    ranks = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps_per_epoch"] == ranks[1]["steps_per_epoch"] > 0
    assert ranks[0]["train_ids_checksum_last_epoch"] != ranks[1]["train_ids_checksum_last_epoch"]


def test_server_gone_mid_epoch_is_one_line(packed, http_root):
    folder, base = http_root
    shutil.copytree(packed, folder / "faces")
    spec = LoaderSpec(f"{base}/faces", "train", train=False, backend="torch", batch_size=2, image_size=32,
                      num_workers=0, storage_options={"connect_timeout": 1, "read_timeout": 1, "attempts": 1})
    it = iter(build_loader(spec))
    next(it)
    shutil.rmtree(folder / "faces")  # the objects are gone (404) for every shard not yet opened
    with pytest.raises(DataError) as e:
        for _ in it:
            pass
    text = str(e.value)
    assert "\n" not in text and f"{base}/faces/" in text and ".tar" in text


def test_unreachable_endpoint_and_missing_prefix(s3_bucket, tmp_path, trained, monkeypatch):
    import s3fs

    out = tmp_path / "e"
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    s3fs.S3FileSystem.clear_instance_cache()
    opts = json.dumps({"connect_timeout": 1, "read_timeout": 1, "attempts": 1})
    rc = evaluate.main(["--checkpoint", str(trained), "--data", f"{s3_bucket}/faces", "--device", "cpu",
                        "--out", str(out), "--storage-options", opts])
    assert rc == 2 and not out.exists()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    from pipeline.data.shards import resolve_shards

    with pytest.raises(DataError, match="manifest.json is missing"):
        resolve_shards(f"{s3_bucket}/nothing-here", "val")


def test_two_nodes_on_loopback_from_s3(packed, s3_bucket, tmp_path):
    """Two `accelerate launch` commands, one per "node" (--num_machines 2, --machine_rank 0|1, rendezvous
    on 127.0.0.1), each one CPU process, both reading --data from the S3 server."""
    url = f"{s3_bucket}/faces"
    _upload(packed, url)
    out, port = tmp_path / "nodes", free_port()
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "pipeline" / "train.py"), "--data", url, "--out", str(out), "--cpu", "--backend", "torch",
               "--workers", "1", *TINY]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=280)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-1500:] for log in logs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    ranks = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert ranks[0]["steps_per_epoch"] == ranks[1]["steps_per_epoch"] > 0
    assert ranks[0]["train_ids_checksum_last_epoch"] != ranks[1]["train_ids_checksum_last_epoch"]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]  # DDP kept the replicas equal
    n_val = json.loads((packed / "manifest.json").read_text())["splits"]["val"]["num_samples"]
    assert summary["best"]["n"] == n_val  # validation counted every sample once over both nodes


def test_server_killed_mid_epoch_is_one_line_and_no_hang(packed, tmp_path):
    import contextlib
    import time

    from servers import http_server

    folder = tmp_path / "www"
    shutil.copytree(packed, folder / "faces")
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(http_server(folder))
        spec = LoaderSpec(f"{base}/faces", "train", train=False, backend="torch", batch_size=2, image_size=32,
                          num_workers=0, storage_options={"connect_timeout": 1, "read_timeout": 1, "attempts": 1})
        it = iter(build_loader(spec))
        next(it)
        stack.close()  # the server is gone: connection refused for every shard not yet opened
        t0 = time.monotonic()
        with pytest.raises(DataError) as e:
            for _ in it:
                pass
    assert time.monotonic() - t0 < 30
    assert "\n" not in str(e.value) and f"{base}/faces/" in str(e.value)


def test_bench_remote_rows_from_s3(packed, s3_bucket, tmp_path):
    from pipeline.bench import main as bench_main

    url = f"{s3_bucket}/faces"
    _upload(packed, url)
    out = tmp_path / "bench.json"
    assert bench_main(["--data", str(packed), "--remote-data", url, "--rows", "remote", "--device", "cpu",
                       "--workers", "1", "--batch-size", "4", "--image-size", "32", "--memory-epochs", "2",
                       "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["remote_local", "remote_stream", "remote_cache"]
    for row in rows.values():
        assert row["status"] == "ok" and len(row["img_s_repeats"]) == 2 and min(row["img_s_repeats"]) > 0
        assert len(row["vs_local_per_epoch"]) == 2 and len(row["pss_per_epoch_mb"]) == 2
    assert rows["remote_local"]["vs_local_per_epoch"] == [1.0, 1.0]
