"""deepfake-train end to end on the real `packed` shards: outputs, losses, errors, resume after SIGKILL,
two processes under `accelerate launch`, both loader backends. Tiny model, 32 px, batch 8."""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.checkpoint import load_checkpoint
from pipeline.data.contract import LoaderSpec, drop_repeats
from pipeline.data.loader import build_loader
from pipeline.scoring.metrics import binary_metrics
from pipeline.train import get_args_parser, main, parse_args
from pipeline.training.rundir import METRIC_COLUMNS

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "deepfakenet_tiny", "--image-size", "32", "--batch-size", "8", "--workers", "0"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _args(packed: Path, out: Path, *extra: str, backend: str = "torch") -> list:
    return ["--data", str(packed), "--out", str(out), "--cpu", "--backend", backend, *TINY, *extra]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _rows(run: Path) -> list:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _val_split(packed: Path) -> dict:
    return json.loads((packed / "manifest.json").read_text())["splits"]["val"]


def _rescore(run: Path, packed: Path, ckpt: str) -> dict:
    """Score the val split again from a saved checkpoint, outside the training code."""
    model, meta = load_checkpoint(run / ckpt)
    loader = build_loader(LoaderSpec(packed, "val", backend="torch", batch_size=8, image_size=meta["image_size"],
                          train=False, num_workers=0))
    ids, scores, labels = [], [], []
    with torch.no_grad():
        for batch in loader:
            ids += batch.ids
            scores += torch.sigmoid(model(batch.images).squeeze(1)).tolist()
            labels += batch.labels.tolist()
    ids, scores, labels = drop_repeats(ids, scores, labels)
    return {"ids": ids, "scores": np.array(scores), "labels": np.array(labels)}


def test_help_explains_every_flag():
    text = get_args_parser().format_help()
    for flag in ("--data", "--out", "--model", "--image-size", "--epochs", "--batch-size", "--lr", "--optimizer",
                 "--loss", "--aug", "--backend", "--workers", "--grad-accum", "--seed", "--resume", "--max-steps",
                 "--recipe", "--cpu", "--mixed-precision"):
        assert flag in text
    for action in get_args_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_recipe_seed_sets_the_original_settings_and_explicit_flags_win(tmp_path):
    args = parse_args(["--data", "d", "--out", "o", "--recipe", "seed"])
    assert (args.optimizer, args.lr, args.loss, args.batch_size, args.image_size, args.aug) == ("adam", 1e-5, "mse", 32, 224, "seed")
    args = parse_args(["--data", "d", "--out", "o", "--recipe", "seed", "--batch-size", "8"])
    assert args.batch_size == 8 and args.lr == 1e-5
    default = parse_args(["--data", "d", "--out", "o"])
    assert (default.optimizer, default.loss, default.schedule) == ("adamw", "bce", "cosine")


def test_single_process_run_writes_every_output(packed, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(_args(packed, run, "--epochs", "2", "--max-steps", "3")) == 0

    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "deepfakenet_tiny" and config["epochs"] == 2 and config["data"] == str(packed)
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert tuple(rows[0]) == METRIC_COLUMNS
    for r in rows:
        for k in METRIC_COLUMNS:
            assert np.isfinite(float(r[k])), (k, r)
        assert float(r["img_s"]) > 0 and float(r["data_wait_s"]) >= 0 and float(r["compute_s"]) > 0
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert _tb_images(run / "tb") == {"explain/val": [1, 2]}  # the fixed val grid with heat maps, every epoch
    with Image.open(run / "curves.png") as im:
        assert im.format == "PNG"
    assert (run / "state" / "epoch_0002" / "progress.json").exists()
    assert not list(run.rglob(".tmp-*"))

    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_processes"] == 1 and summary["distributed_type"] == "NO"
    assert summary["epochs"] == 2 and summary["steps_per_epoch"] == 3
    # Every val sample is counted exactly once.
    val = _val_split(packed)
    assert summary["best"]["n"] == val["num_samples"]
    assert summary["best"]["n_fake"] == val["classes"]["fake"]
    assert summary["best_epoch"] in (1, 2)

    # The weights in last.safetensors reproduce the last epoch's validation metrics.
    model, meta = load_checkpoint(run / "last.safetensors")
    assert meta["model"] == "deepfakenet_tiny" and meta["image_size"] == 32 and meta["epoch"] == 2
    again = _rescore(run, packed, "last.safetensors")
    assert sorted(again["ids"]) == sorted(set(again["ids"])) and len(again["ids"]) == val["num_samples"]
    m = binary_metrics(again["labels"], again["scores"])
    assert m["roc_auc"] == pytest.approx(float(rows[-1]["val_roc_auc"]), abs=1e-6)
    assert m["accuracy"] == pytest.approx(float(rows[-1]["val_accuracy"]), abs=1e-6)
    _, best_meta = load_checkpoint(run)  # a run dir resolves to best.safetensors
    assert best_meta["epoch"] == summary["best_epoch"]

    # A finished run is not overwritten; --resume on it has nothing to do; other settings are refused.
    caplog.clear()
    assert main(_args(packed, run, "--epochs", "2", "--max-steps", "3")) == 2
    assert "already holds a finished run" in caplog.text
    assert main(_args(packed, run, "--epochs", "2", "--max-steps", "3", "--resume")) == 0
    caplog.clear()
    assert main(_args(packed, run, "--epochs", "2", "--max-steps", "3", "--resume", "--lr", "0.01")) == 2
    assert "--lr 0.001 (saved) vs 0.01 (now)" in caplog.text
    assert _rows(run) == rows


def _tb_images(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def test_explain_val_0_turns_the_grid_off_and_may_change_on_resume(packed, tmp_path):
    run = tmp_path / "run"
    assert main(_args(packed, run, "--epochs", "1", "--max-steps", "1", "--explain-val", "0")) == 0
    assert _tb_images(run / "tb") == {}
    assert json.loads((run / "config.json").read_text())["explain_val"] == 0
    # What TensorBoard shows is not a training setting: a resumed run may show another grid.
    assert main(_args(packed, run, "--epochs", "1", "--max-steps", "1", "--resume", "--explain-val", "4")) == 0


def test_mse_loss_is_squared_error_of_the_sigmoid(packed, tmp_path):
    run = tmp_path / "mse"
    assert main(_args(packed, run, "--epochs", "1", "--max-steps", "2", "--loss", "mse", "--optimizer", "adam")) == 0
    row = _rows(run)[0]
    again = _rescore(run, packed, "last.safetensors")
    mse = float(np.mean((again["scores"] - again["labels"]) ** 2))
    assert float(row["val_loss"]) == pytest.approx(mse, rel=1e-5)
    assert 0 <= float(row["train_loss"]) <= 1


def _broken_copy(packed: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / f"pack-{how}"
    shutil.copytree(packed, copy)
    manifest = copy / "manifest.json"
    if how == "no-manifest":
        manifest.unlink()
    elif how == "no-val":
        data = json.loads(manifest.read_text())
        del data["splits"]["val"]
        manifest.write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    "case, extra, match",
    [
        ("missing-data", [], "no such pack output folder"),
        ("no-manifest", [], "manifest.json is missing"),
        ("no-val", [], "no 'val' split"),
        ("unknown-model", ["--model", "resnet9000"], "--model 'resnet9000': choose one of deepfakenet_base"),
        ("small-image", ["--image-size", "16"], "--image-size 16: must be a whole number of pixels in [32, 4096]"),
        ("big-batch", ["--batch-size", "4096"], "--batch-size 4096: larger than each process's share"),
        ("bad-lr", ["--lr", "-1"], "--lr -1.0: must be a positive number"),
        ("bad-explain-val", ["--explain-val", "-1"], "--explain-val -1: must be >= 0"),
        ("big-explain-val", ["--explain-val", "65"], "--explain-val 65: at most 64"),
        ("out-not-run", [], "folder exists and is not empty"),
        ("out-file", [], "is a file, expected a run directory"),
    ],
)
def test_bad_arguments_give_one_clear_line(packed, tmp_path, caplog, case, extra, match):
    data = packed
    if case == "missing-data":
        data = tmp_path / "nope"
    elif case in ("no-manifest", "no-val"):
        data = _broken_copy(packed, tmp_path, case)
    out = tmp_path / "run"
    if case == "out-not-run":
        out.mkdir()
        (out / "something.txt").write_text("x")
    elif case == "out-file":
        out.write_text("x")
    with caplog.at_level(logging.ERROR):
        rc = main(_args(data, out, "--epochs", "1", "--max-steps", "1", *extra))
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert match in errors[0]
    if case == "out-file":
        assert out.read_text() == "x"  # left alone
    else:
        assert not (out / "summary.json").exists()


def _train_cmd(packed: Path, out: Path, *extra: str) -> list:
    return [sys.executable, str(REPO / "pipeline" / "train.py"), *_args(packed, out, *extra)]


def test_resume_after_sigkill_matches_an_uninterrupted_run(packed, tmp_path, caplog):
    common = ("--epochs", "2", "--max-steps", "3", "--seed", "3")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_cmd(packed, straight, *common), env=_env(), check=True, capture_output=True, timeout=300)

    # SIGKILL in the middle of epoch 2, after epoch 1's state was saved.
    kill = [sys.executable, str(REPO / "tests" / "kill_after.py"), "2:2", *_args(packed, killed, *common)]
    proc = subprocess.run(kill, env=_env(), capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists()
    assert [p.name for p in (killed / "state").iterdir()] == ["epoch_0001"]

    caplog.clear()
    assert main(_args(packed, killed, *common)) == 2
    assert "unfinished run (pass --resume" in caplog.text
    proc = subprocess.run(_train_cmd(packed, killed, *common, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" in proc.stderr and "after epoch 1" in proc.stderr

    a, b = _rows(straight), _rows(killed)
    assert [r["epoch"] for r in b] == ["1", "2"]
    for ra, rb in zip(a, b):
        for k in ("train_loss", "val_loss", "val_accuracy", "val_roc_auc", "val_average_precision", "val_eer", "lr"):
            assert float(rb[k]) == pytest.approx(float(ra[k]), rel=1e-5, abs=1e-6), (k, ra, rb)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (straight, killed))
    assert sb["best_epoch"] == sa["best_epoch"]
    assert sb["final"]["val_roc_auc"] == pytest.approx(sa["final"]["val_roc_auc"], abs=1e-6)


def test_two_cpu_processes_under_accelerate_launch(packed, tmp_path):
    run = tmp_path / "ddp"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO / "pipeline" / "train.py"), *_args(packed, run, "--epochs", "2", "--max-steps", "2")]
    env = dict(_env(), ACCELERATE_USE_CPU="true")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    assert summary["global_batch_size"] == 16
    for name in ("config.json", "metrics.csv", "curves.png", "best.safetensors", "last.safetensors"):
        assert (run / name).exists(), name
    assert list((run / "tb").glob("events.out.tfevents.*")) and (run / "state" / "epoch_0002").is_dir()
    assert len(_rows(run)) == 2
    assert _tb_images(run / "tb") == {"explain/val": [1, 2]}  # drawn on the main process, DDP undisturbed (below)

    ranks = [json.loads((run / "ranks" / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 and r["steps_per_epoch"] == 2 for r in ranks)
    # DDP kept the weights identical, the gathered validation is the same on both ranks,
    # and the ranks trained on different samples.
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    assert ranks[0]["final_val"] == ranks[1]["final_val"]
    assert ranks[0]["train_ids_checksum_last_epoch"] != ranks[1]["train_ids_checksum_last_epoch"]
    # Each val sample counted once after gathering both ranks' parts.
    assert summary["best"]["n"] == _val_split(packed)["num_samples"]


def test_dali_backend_trains(packed, tmp_path):
    pytest.importorskip("nvidia.dali")
    run = tmp_path / "dali"
    assert main(_args(packed, run, "--epochs", "1", "--max-steps", "2", backend="dali")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["backend"] == "dali" and summary["best"]["n"] == _val_split(packed)["num_samples"]
    assert np.isfinite(float(_rows(run)[0]["val_loss"]))


def test_grad_accum_and_bf16_autocast(packed, tmp_path):
    run = tmp_path / "accum"
    # 3 batches with accumulation over 2: the epoch is cut to 2 so no accumulation spans epochs.
    assert main(_args(packed, run, "--epochs", "1", "--max-steps", "3", "--grad-accum", "2",
                      "--mixed-precision", "bf16")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and summary["steps_per_epoch"] == 2
    assert summary["global_batch_size"] == 16
    assert np.isfinite(float(_rows(run)[0]["train_loss"]))
    assert _tb_images(run / "tb") == {"explain/val": [1]}  # heat maps from bf16 activations too


def test_auto_backend_on_cpu_is_torch(packed, tmp_path):
    run = tmp_path / "auto"
    assert main(_args(packed, run, "--epochs", "1", "--max-steps", "2", backend="auto")) == 0
    assert json.loads((run / "config.json").read_text())["backend"] == "auto"
    assert json.loads((run / "summary.json").read_text())["backend"] == "torch"  # what actually ran


def test_diverging_run_stops_with_one_line(packed, tmp_path, caplog):
    rc = main(_args(packed, tmp_path / "run", "--epochs", "1", "--lr", "1e30", "--clip-grad", "0",
                    "--warmup-epochs", "0"))
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "diverged at epoch 1 step" in errors[0] and "--lr" in errors[0]
