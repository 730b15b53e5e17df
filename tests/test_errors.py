"""evaluate --errors picks exactly the N most confident mistakes of each set (folders, shards, --set),
draws them (PNG + TensorBoard) and lists them in metrics.json; train's fixed val grid (issue 26)."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_image_dirs
from PIL import Image

from model import create_model
from pipeline import evaluate
from pipeline.checkpoint import save_checkpoint
from pipeline.scoring.errors import TB_EVENTS, ValGrid, pick_errors


def test_pick_errors_on_known_scores():
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 0, 1]
    scores = [0.9, 0.5, 0.7, 0.2, 0.1, 0.49, 0.8, 0.1, 0.9, 0.3]
    fp, fn = pick_errors(labels, scores, 2, 0.5)
    assert fp == [0, 8]  # 0.9 and 0.9 (tie: input order) beat 0.7; 0.5 counts as called fake
    assert fn == [4, 7]  # 0.1, 0.1 (tie: input order); 0.3 and 0.49 are less confident
    fp, fn = pick_errors(labels, scores, 10, 0.5)
    assert fp == [0, 8, 2, 1] and fn == [4, 7, 9, 5]  # every mistake, no correct call
    assert pick_errors(labels, scores, 3, 0.95) == ([], [4, 7, 9])


def _untrained(tmp_path: Path) -> Path:
    """A random-init tiny model: its calls are about as often wrong as right, in both directions."""
    torch.manual_seed(3)
    return save_checkpoint(tmp_path / "untrained.safetensors", create_model("deepfakenet_tiny").eval(),
                           model_name="deepfakenet_tiny", image_size=32)


def _scores(path: Path) -> list:
    with open(path, newline="") as f:
        return [{**r, "score": float(r["score"])} for r in csv.DictReader(f)]


def _tb_images(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def test_errors_are_exactly_the_n_most_confident_mistakes(tmp_path, caplog):
    real, fake = make_image_dirs(tmp_path / "images", n_real=16, n_fake=16, size=40, seed=4)
    ckpt = _untrained(tmp_path)
    common = ["--checkpoint", str(ckpt), "--real", str(real), "--fake", str(fake), "--device", "cpu", "--workers", "0"]
    assert evaluate.main([*common, "--out", str(tmp_path / "plain")]) == 0
    rows = _scores(tmp_path / "plain" / "scores.csv")
    threshold = float(np.median([r["score"] for r in rows]))  # mistakes on both sides
    out = tmp_path / "errors"
    with caplog.at_level(logging.INFO):
        assert evaluate.main([*common, "--out", str(out), "--errors", "3", "--threshold", str(threshold)]) == 0
    rows = _scores(out / "scores.csv")
    fps = sorted((r for r in rows if r["label"] == "real" and r["score"] >= threshold), key=lambda r: -r["score"])
    fns = sorted((r for r in rows if r["label"] == "fake" and r["score"] < threshold), key=lambda r: r["score"])
    assert len(fps) > 3 and len(fns) > 3  # so that picking 3 is a choice
    errors = json.loads((out / "metrics.json").read_text())["errors"]
    entry = errors["sets"]["all"]
    assert [e["id"] for e in entry["false_positives"]] == [r["id"] for r in fps[:3]]
    assert [e["id"] for e in entry["false_negatives"]] == [r["id"] for r in fns[:3]]
    assert entry["n_false_positives"] == len(fps) and entry["n_false_negatives"] == len(fns)
    assert errors["png"] == ["errors.png"] and errors["tensorboard"] == TB_EVENTS and errors["n"] == 3
    with Image.open(out / "errors.png") as im:
        assert im.format == "PNG" and im.width > 3 * 2 * 128 and im.height > 2 * 128
    assert _tb_images(out) == {"errors/all": [0]}
    assert not list(out.glob(".tmp-*"))

    # Without --errors the grid and its event file of the earlier run go (outputs of one run only).
    assert evaluate.main([*common, "--out", str(out)]) == 0
    assert not (out / "errors.png").exists() and not (out / TB_EVENTS).exists()


def test_errors_per_set_and_on_shards(trained, packed, tmp_path):
    a = make_image_dirs(tmp_path / "a", n_real=6, n_fake=6, size=48, seed=11)
    b = make_image_dirs(tmp_path / "b", n_real=6, n_fake=6, size=48, seed=12)
    out = tmp_path / "sets"
    assert evaluate.main(["--checkpoint", str(trained), "--data", str(packed), "--split", "val", "--set",
                          f"one={a[0]},{a[1]}", "--set", f"two set={b[0]},{b[1]}", "--errors", "2", "--threshold",
                          "0.3", "--scoring", "resize", "--out", str(out), "--device", "cpu", "--workers", "0"]) == 0
    errors = json.loads((out / "metrics.json").read_text())["errors"]
    assert set(errors["sets"]) == {f"{packed.name}:val", "one", "two set"}
    assert errors["png"] == [f"errors-{packed.name}_val.png", "errors-one.png", "errors-two_set.png"]
    for name in errors["png"]:
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    assert set(_tb_images(out)) == {f"errors/{n}" for n in errors["sets"]}
    for entry in errors["sets"].values():
        assert len(entry["false_positives"]) == min(2, entry["n_false_positives"])
        assert len(entry["false_negatives"]) == min(2, entry["n_false_negatives"])


def test_errors_bad_layer_is_one_line_before_scoring(trained, image_dirs, tmp_path, caplog):
    real, fake = image_dirs
    rc = evaluate.main(["--checkpoint", str(trained), "--real", str(real), "--fake", str(fake), "--errors", "2",
                        "--cam-layer", "head", "--out", str(tmp_path / "e"), "--device", "cpu", "--workers", "0"])
    assert rc == 2
    errors = [r.message for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "--cam-layer head: no such layer" in errors[0]
    assert not (tmp_path / "e").exists()


def test_val_grid_takes_the_first_ids_of_each_class(packed):
    grid = ValGrid.from_shards(sorted(str(p) for p in packed.glob("val-*.tar")), 5, image_size=48,
                               preprocess="resize")
    from pipeline.data.folders import shard_items

    items = sorted(shard_items(sorted(str(p) for p in packed.glob("val-*.tar"))), key=lambda it: it.path)
    want = [it for it in items if it.label == 0][:3] + [it for it in items if it.label == 1][:2]
    assert grid.names == [it.source for it in want] and grid.labels == [0, 0, 0, 1, 1]
    model = create_model("deepfakenet_tiny")
    image = grid.image(model)
    assert image.dtype == np.uint8 and image.ndim == 3 and grid.layer == "stages.2"  # 3x3 at 48 px
    assert ValGrid.from_shards([str(p) for p in packed.glob("val-*.tar")], 0, image_size=48, preprocess="resize") is None
