"""Several pack outputs in one training run (issue 24, part 3): --data parsing, each source sampled at its
weight (counted), validation per source and together, what is recorded, what is refused."""
from __future__ import annotations

import csv
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from helpers import make_image_dirs, pack_dirs

from pipeline import evaluate
from pipeline.checkpoint import read_metadata
from pipeline.data.contract import LoaderSpec, rank_share
from pipeline.data.loader import build_loader
from pipeline.data.mixture import quotas
from pipeline.train import main as train_main
from pipeline.training.sources import parse_data, source_names

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """A second, smaller pack output with other images: 15 real + 15 fake 48x48 JPEGs."""
    root = tmp_path_factory.mktemp("other")
    real, fake = make_image_dirs(root / "images", n_real=15, n_fake=15, size=48, seed=2)
    return pack_dirs(real, fake, root / "other", "--val-fraction", "0.25", "--shard-size", "10", "--min-shards", "2")


def _keys(pack: Path, split: str) -> set:
    out = set()
    for tar in pack.glob(f"{split}-*.tar"):
        with tarfile.open(tar) as tf:
            out |= {Path(n).stem for n in tf.getnames()}
    return out


def test_parse_data_forms(tmp_path):
    assert parse_data(["a"]) == ("a", None)
    assert parse_data(["a", "b"]) == (("a", "b"), None)
    assert parse_data(["a:0.7,b:0.3"]) == (("a", "b"), (0.7, 0.3))
    assert parse_data(["a:2", "s3://bucket/b:1"]) == (("a", "s3://bucket/b"), (2.0, 1.0))
    assert parse_data(["s3://bucket/faces"]) == ("s3://bucket/faces", None)  # a URL's colon is no weight
    assert parse_data(["x,y"]) == ("x,y", None)  # a comma splits only a list of weighted sources
    odd = tmp_path / "faces:2"
    odd.mkdir()
    assert parse_data([str(odd)]) == (str(odd), None)  # an existing path is taken as written
    for values, match in ((["a:1", "b"], "every source or to none"), (["a", "a"], "given twice")):
        with pytest.raises(ValueError, match=match):
            parse_data(values)
    assert source_names(["/d/faces", "/e/faces/", "s3://b/ff++ c23"]) == ["faces", "faces_2", "ff_c23"]


def test_quotas_share_one_epoch_by_weight():
    assert quotas([60, 20], None) == [60, 20]
    assert quotas([60, 20], [0.7, 0.3]) == [56, 24]
    assert quotas([60, 22], [1, 1]) == [41, 41]
    assert sum(quotas([7, 5, 3], [0.2, 0.3, 0.5])) == 15


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("weights", [None, (0.7, 0.3), (0.5, 0.5)])
def test_each_source_is_sampled_at_its_weight(packed, other, world_size, weights):
    """Samples seen per source over one epoch, per rank, counted by id.

    Each rank reads exactly its share of each source's quota (``rank_share(q_s, r, W)``); training then
    drops the rank's last ``own - steps * batch`` samples (fewer than one batch), which come from the
    end of the shuffle buffer, of either source. So the count of source ``s`` lies in
    ``[share_s - dropped, share_s]``: that is the tolerance, exact rather than statistical."""
    keys = {"a": _keys(packed, "train"), "b": _keys(other, "train")}
    n = {k: len(v) for k, v in keys.items()}
    q = dict(zip("ab", quotas([n["a"], n["b"]], weights)))
    steps = set()
    for rank in range(world_size):
        loader = build_loader(LoaderSpec((str(packed), str(other)), "train", train=True, backend="torch",
                                         batch_size=8, image_size=32, aug="none", rank=rank, world_size=world_size,
                                         num_workers=2, weights=weights, seed=3))
        loader.set_epoch(1)
        seen = [i for batch in loader for i in batch.ids]
        count = Counter("a" if i in keys["a"] else "b" if i in keys["b"] else "?" for i in seen)
        dropped = loader.own - len(seen)
        assert len(seen) == len(loader) * 8 and 0 <= dropped < 8 and "?" not in count
        for s in "ab":
            share = rank_share(q[s], rank, world_size)
            assert share - dropped <= count[s] <= share, (s, count, share, dropped)
            if q[s] <= n[s]:  # read at most once: no id repeats
                assert len({i for i in seen if i in keys[s]}) == count[s]
        steps.add(len(loader))
    assert len(steps) == 1  # equal steps on every rank, whatever each one's share


def test_an_underweighted_source_gives_another_subset_each_epoch(packed, other):
    spec = LoaderSpec((str(packed), str(other)), "train", train=True, backend="torch", batch_size=4, image_size=32,
                      aug="none", num_workers=0, weights=(0.2, 0.8))
    loader = build_loader(spec)
    a = _keys(packed, "train")
    subsets = []
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        subsets.append({i for batch in loader for i in batch.ids if i in a})
    assert subsets[0] != subsets[1]


def test_training_on_two_sources_reports_each_and_all(packed, other, tmp_path, caplog):
    run = tmp_path / "run"
    args = ["--data", f"{packed}:0.7,{other}:0.3", "--out", str(run), "--cpu", "--backend", "torch",
            "--model", "deepfakenet_tiny", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "2"]
    with caplog.at_level(logging.INFO):
        assert train_main(args) == 0
    names = ["shards", "other"]
    assert "source shards:" in caplog.text and "  val other (" in caplog.text
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name in names:
        for key in ("loss", "accuracy", "roc_auc", "average_precision", "eer"):
            assert rows[-1][f"val_{key}/{name}"] != ""
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == [str(packed), str(other)] and config["data_weights"] == [0.7, 0.3]
    summary = json.loads((run / "summary.json").read_text())
    table = {s["name"]: s for s in summary["sources"]}
    assert table["shards"]["weight"] == 0.7 and table["other"]["data"] == str(other)
    assert table["shards"]["epoch_samples"] + table["other"]["epoch_samples"] == summary["train_samples"]
    n_val = {name: table[name]["val_samples"] for name in names}
    assert summary["best"]["n"] == sum(n_val.values())  # together: every val sample of both, once
    assert {k: v["n"] for k, v in summary["best"]["sources"].items()} == n_val
    meta = read_metadata(run)
    assert [s["name"] for s in json.loads(meta["sources"])] == names  # extra metadata: a JSON string
    assert meta["metrics"]["sources"]["other"]["n"] == n_val["other"]
    tags = _tb_tags(run)
    assert {"val/roc_auc/shards", "val/roc_auc/other", "val/roc_auc"} <= tags

    # the per-source AUC is what evaluate gives on that source alone, from the best checkpoint
    best = rows[summary["best_epoch"] - 1]
    for name, pack in zip(names, (packed, other)):
        assert evaluate.main(["--checkpoint", str(run), "--data", str(pack), "--out", str(tmp_path / name),
                              "--backend", "torch", "--workers", "0", "--device", "cpu"]) == 0
        auc = json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]["roc_auc"]
        assert auc == pytest.approx(float(best[f"val_roc_auc/{name}"]), abs=1e-6)
    # the same flags resume the finished run (the sources compare equal)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train_main(args + ["--resume"]) == 0
    assert "already finished" in caplog.text


def _tb_tags(run: Path) -> set:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("extra, match", [
    (["--backend", "dali"], "--data (several sources): not implemented in the DALI backend; use --backend torch"),
    (["--val-data", "V"], "--val-data: with several --data sources"),
    (["--fakes", "sbi-only", "--self-blend", "0.5"], "--fakes sbi-only: not implemented with several --data"),
])
def test_what_several_sources_cannot_do_is_one_line(packed, other, tmp_path, caplog, extra, match):
    rc = train_main(["--data", str(packed), "--data", str(other), "--out", str(tmp_path / "run"), "--cpu",
                     "--model", "deepfakenet_tiny", "--image-size", "32", "--batch-size", "8", *extra])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert rc == 2 and len(errors) == 1 and match in errors[0], errors


def test_dali_loader_refuses_and_auto_picks_torch(packed, other):
    pytest.importorskip("nvidia.dali", reason="the DALI backend needs nvidia-dali")
    sources = (str(packed), str(other))
    with pytest.raises(ValueError, match=r"--data \(several sources\): not implemented in the DALI backend"):
        build_loader(LoaderSpec(sources, "train", train=True, backend="dali", batch_size=8, image_size=32))
    assert LoaderSpec(sources, "train", train=True, backend="auto", device="cpu").backend == "torch"
    with pytest.raises(ValueError, match="only for training"):
        LoaderSpec(sources, "val", train=False)


def test_two_processes_get_equal_steps_from_unequal_shares(packed, other, tmp_path):
    """Real DDP over gloo: odd weighted quotas split unevenly over 2 ranks (here 59 + 25 of 84: 29/30 and
    12/13 per rank), yet both run the same steps (fewer on one rank would hang the other in all-reduce)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(repo / "pipeline" / "train.py"), "--cpu", "--data", f"{packed}:0.7,{other}:0.3", "--out", str(run),
           "--model", "deepfakenet_tiny", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo), ACCELERATE_USE_CPU="true")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    ranks = [json.loads((run / "ranks" / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert summary["num_processes"] == 2 and ranks[0]["steps_per_epoch"] == ranks[1]["steps_per_epoch"] > 0
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    assert summary["best"]["n"] == sum(s["val_samples"] for s in summary["sources"])
