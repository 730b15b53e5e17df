"""evaluate: shards vs folders agree, metrics vs scikit-learn, skipped files, robustness, CLI errors.

A tiny DeepfakeNet is trained for a few steps on the `packed` fixture through the real torch loader
and saved with `save_checkpoint` (the session-scoped `trained` fixture of conftest.py).
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import help_text, make_face, make_image_dirs, write_image
from safetensors.torch import save_file
from sklearn.metrics import accuracy_score, average_precision_score, confusion_matrix, roc_auc_score

from pipeline import evaluate
from pipeline.augment.degrade import SWEEP, Degradation, default_sweep
from pipeline.checkpoint import save_checkpoint
from pipeline.data.folders import Item
from pipeline.scoring.modes import ModeItems
from pipeline.scoring.score import Scores, per_group


def resized_checkpoint(run: Path, size: int, out: Path) -> Path:
    """The same weights with another ``image_size`` in the metadata (the model pools adaptively)."""
    from pipeline.checkpoint import load_checkpoint

    model, meta = load_checkpoint(run)
    return save_checkpoint(out, model, model_name=meta["model"], image_size=size)


def read_scores(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def val_sources(packed: Path) -> dict[str, Path]:
    """key -> source file of every val sample (key = first 32 hex of the file's sha256)."""
    images = packed.parent / "images"
    by_key = {hashlib.sha256(p.read_bytes()).hexdigest()[:32]: p for p in images.rglob("*.jpg")}
    keys = set()
    for shard in json.loads((packed / "manifest.json").read_text())["splits"]["val"]["shards"]:
        import tarfile

        with tarfile.open(packed / shard["name"]) as tf:
            keys.update(m.name.split(".", 1)[0] for m in tf.getmembers())
    return {k: by_key[k] for k in keys}


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_shards_and_folders_agree(trained, packed, tmp_path, backend):
    ckpt = resized_checkpoint(trained, 40, tmp_path / "at40.safetensors")  # 48 px images -> 40: resize on both paths
    rc = evaluate.main(["--checkpoint", str(ckpt), "--data", str(packed), "--split", "val", "--backend", backend,
                        "--workers", "0", "--device", "cpu", "--batch-size", "7", "--out", str(tmp_path / "shards")])
    assert rc == 0
    sources = val_sources(packed)
    for key, src in sources.items():  # the same val images as plain folders
        dst = tmp_path / "folders" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    rc = evaluate.main(["--checkpoint", str(ckpt), "--real", str(tmp_path / "folders/real"),
                        "--fake", str(tmp_path / "folders/fake"), "--workers", "0", "--device", "cpu",
                        "--out", str(tmp_path / "folders_eval")])
    assert rc == 0
    shard_rows = read_scores(tmp_path / "shards/scores.csv")
    folder_rows = read_scores(tmp_path / "folders_eval/scores.csv")
    manifest = json.loads((packed / "manifest.json").read_text())
    assert len(shard_rows) == manifest["splits"]["val"]["num_samples"] == len(sources)  # each sample once
    assert len({r["id"] for r in shard_rows}) == len(shard_rows)
    by_name = {Path(r["id"]).name: r for r in folder_rows}
    diffs = []
    for r in shard_rows:
        src = sources[r["id"]]
        assert r["source"] == src.name
        assert r["label"] == src.parent.name  # labels end to end: real/ -> real, fake/ -> fake
        f = by_name[src.name]
        assert f["label"] == r["label"]
        diffs.append(abs(float(f["score"]) - float(r["score"])))
    print(f"max |score diff| shards vs folders ({backend}): {max(diffs):.2e}")
    # torch loader: the same decode and the same resize_uint8 as the folder path, so equal up to float
    # rounding; DALI's CPU decoder and its own resize differ from Pillow + torchvision by a few levels
    assert max(diffs) < (1e-4 if backend == "torch" else 0.02)
    ms = json.loads((tmp_path / "shards/metrics.json").read_text())["metrics"]
    mf = json.loads((tmp_path / "folders_eval/metrics.json").read_text())["metrics"]
    assert (ms["n_real"], ms["n_fake"]) == (mf["n_real"], mf["n_fake"]) == (
        manifest["splits"]["val"]["classes"]["real"], manifest["splits"]["val"]["classes"]["fake"])


def test_metrics_match_sklearn(trained, tmp_path):
    real, fake = make_image_dirs(tmp_path / "a", n_real=10, n_fake=8, size=48, seed=3)
    _, fake2 = make_image_dirs(tmp_path / "b", n_real=0, n_fake=6, size=56, seed=4)
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(trained), "--real", str(real), "--fake", str(fake), str(fake2),
                        "--workers", "0", "--device", "cpu", "--threshold", "0.45", "--out", str(out)])
    assert rc == 0
    rows = read_scores(out / "scores.csv")
    y = np.array([r["label"] == "fake" for r in rows], dtype=int)
    s = np.array([float(r["score"]) for r in rows])
    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    assert (m["n"], m["n_real"], m["n_fake"]) == (24, 10, 14)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-5)  # scores.csv rounds to 1e-6
    assert m["average_precision"] == pytest.approx(average_precision_score(y, s), abs=1e-4)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, (s >= 0.45).astype(int)))
    assert m["confusion_matrix"] == confusion_matrix(y, (s >= 0.45).astype(int), labels=[0, 1]).tolist()
    assert m["accuracy_at_eer"] == pytest.approx(accuracy_score(y, (s >= m["eer_threshold"]).astype(int)))
    assert 0.0 <= m["eer"] <= 1.0
    # per input folder: each fake folder against all reals
    folders = {row["folder"]: row for row in report["per_folder"]}
    assert set(folders) == {str(real), str(fake), str(fake2)}
    for folder, n in ((fake, 8), (fake2, 6)):
        mask = np.array([r["group"] == str(folder) for r in rows])
        pair = mask | (y == 0)
        row = folders[str(folder)]
        assert row["n"] == n and row["label"] == "fake"
        assert row["roc_auc_vs_other_class"] == pytest.approx(roc_auc_score(y[pair], s[pair]), abs=1e-5)
        assert row["accuracy"] == pytest.approx(float((s[mask] >= 0.45).mean()))
    assert folders[str(real)]["accuracy"] == pytest.approx(float((s[y == 0] < 0.45).mean()))
    for name in ("roc.png", "scores.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_group_on_known_scores():
    s = Scores(ids=list("abcdef"), sources=list("abcdef"), groups=["R", "R", "F1", "F1", "F2", "F2"],
                        labels=np.array([0, 0, 1, 1, 1, 1]), scores=np.array([0.1, 0.6, 0.7, 0.2, 0.9, 0.8]))
    rows = {r["folder"]: r for r in per_group(s, 0.5, eer_threshold=0.65)}
    assert rows["R"]["accuracy"] == 0.5 and rows["R"]["accuracy_at_eer"] == 1.0
    assert rows["F1"]["roc_auc_vs_other_class"] == pytest.approx(roc_auc_score([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.2]))
    assert rows["F2"]["roc_auc_vs_other_class"] == 1.0 and rows["F2"]["mean_score"] == pytest.approx(0.85)
    assert rows["R"]["roc_auc_vs_other_class"] == pytest.approx(roc_auc_score([0, 0, 1, 1, 1, 1], s.scores))


def test_bad_files_are_skipped_and_listed(trained, tmp_path):
    real, fake = make_image_dirs(tmp_path, n_real=5, n_fake=5, size=48, seed=5)
    (real / "notes.txt").write_text("not an image")
    good = (fake / "f0000.jpg").read_bytes()
    (fake / "cut.jpg").write_bytes(good[: len(good) // 2])
    (fake / ".hidden.jpg").write_bytes(good)
    (real / "empty.png").write_bytes(b"")
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(trained), "--real", str(real), "--fake", str(fake), "--workers", "1",
                        "--device", "cpu", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    reasons = {Path(k["path"]).name: (k["reason"], k["label"]) for k in report["skipped"]}
    assert reasons == {"notes.txt": ("not-an-image", "real"), "cut.jpg": ("truncated", "fake"),
                       ".hidden.jpg": ("hidden", "fake"), "empty.png": ("zero-byte", "real")}
    assert report["n_skipped"] == 4
    assert (report["metrics"]["n_real"], report["metrics"]["n_fake"]) == (5, 5)
    assert len(read_scores(out / "scores.csv")) == 10


def test_robustness_on_folders(trained, tmp_path):
    real, fake = make_image_dirs(tmp_path, n_real=6, n_fake=6, size=64, seed=6)
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(trained), "--real", str(real), "--fake", str(fake), "--workers", "0",
                        "--device", "cpu", "--out", str(out), "--robustness"])
    assert rc == 0
    rob = json.loads((out / "robustness.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert rob["clean"]["roc_auc"] == pytest.approx(metrics["roc_auc"])
    assert list(rob["degradations"]) == list(SWEEP)
    for kind, (levels, _) in SWEEP.items():
        got = rob["degradations"][kind]["levels"]
        assert [e["level"] for e in got] == list(levels)
        for e in got:
            assert e["n"] == 12 and e["n_failed"] == 0
            assert 0.0 <= e["roc_auc"] <= 1.0 and 0.0 <= e["accuracy"] <= 1.0
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_robustness_on_shards(trained, packed, tmp_path):
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(trained), "--data", str(packed), "--backend", "torch", "--workers", "0",
                        "--device", "cpu", "--out", str(out), "--robustness"])
    assert rc == 0
    rob = json.loads((out / "robustness.json").read_text())
    n_val = json.loads((packed / "manifest.json").read_text())["splits"]["val"]["num_samples"]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    # the tiny model learned the fixture's checkerboard: a label flip anywhere would put this below 0.5
    assert metrics["roc_auc"] > 0.8
    assert rob["clean"]["n"] == n_val
    assert rob["clean"]["roc_auc"] == pytest.approx(metrics["roc_auc"], abs=0.05)  # Pillow vs loader decode
    assert sum(len(v["levels"]) for v in rob["degradations"].values()) == len(default_sweep())
    assert all(e["n"] == n_val for v in rob["degradations"].values() for e in v["levels"])


def test_degradations_change_the_image_not_its_shape():
    img = make_face(np.random.default_rng(0), size=48, fake=True)
    checker = ((np.indices((48, 48)).sum(0) % 2) * 2 - 1)[..., None]
    energy = []
    for sigma in SWEEP["blur"][0]:
        out = Degradation("blur", sigma)(img)
        energy.append(float(np.abs((out.astype(float) - out.mean()) * checker).mean()))
    assert energy == sorted(energy, reverse=True)  # more blur, less checkerboard
    for d in default_sweep():
        out = d(img)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert not np.array_equal(out, img), d.name
    with pytest.raises(ValueError, match="jpeg quality"):
        Degradation("jpeg", 0)
    with pytest.raises(ValueError, match="choose one of"):
        Degradation("noise", 1)


def test_degradation_is_applied_before_the_resize(tmp_path):
    path = write_image(tmp_path / "x.png", make_face(np.random.default_rng(1), size=64, fake=True))
    items = [Item(str(path), 1)]
    clean = ModeItems(items, 32, "resize")[0][1][0]
    blurred = ModeItems(items, 32, "resize", degrade=Degradation("blur", 3.0))[0][1][0]
    assert clean.shape == blurred.shape == (3, 32, 32)
    assert not torch.equal(clean, blurred)


def test_help_and_usage_errors(capsys):
    text = help_text(evaluate.main, capsys)
    for flag in ("--checkpoint", "--data", "--split", "--real", "--fake", "--out", "--batch-size", "--backend",
                 "--workers", "--device", "--threshold", "--robustness"):
        assert flag in text
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", "x", "--data", "d", "--real", "r", "--fake", "f"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", "x", "--real", "r"])
    assert e.value.code == 2


def test_bad_checkpoints_give_clear_errors(tmp_path, caplog, image_dirs):
    real, fake = image_dirs
    args = ["--real", str(real), "--fake", str(fake), "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "e")]
    assert evaluate.main(["--checkpoint", str(tmp_path / "missing.safetensors"), *args]) == 2
    assert "missing.safetensors: no such checkpoint" in caplog.text
    (tmp_path / "run").mkdir()
    assert evaluate.main(["--checkpoint", str(tmp_path / "run"), *args]) == 2
    assert "has no best.safetensors" in caplog.text
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert evaluate.main(["--checkpoint", str(tmp_path / "junk.safetensors"), *args]) == 2
    assert "not a safetensors file" in caplog.text
    from model import create_model

    small = tmp_path / "wrong.safetensors"
    sd = {k: v for k, v in create_model("deepfakenet_tiny").state_dict().items() if not k.startswith("fc.")}
    save_file(sd, small, metadata={"format": "deepfake-detector/1", "model": "deepfakenet_tiny", "image_size": "32"})
    assert evaluate.main(["--checkpoint", str(small), *args]) == 2
    assert "missing keys fc." in caplog.text
    assert not (tmp_path / "e").exists()


def test_missing_folder_is_a_clear_error(trained, tmp_path, caplog, image_dirs):
    real, _ = image_dirs
    rc = evaluate.main(["--checkpoint", str(trained), "--real", str(real), "--fake", str(tmp_path / "nope"),
                        "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "e")])
    assert rc == 2
    assert f"{tmp_path / 'nope'}: no such file or folder" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_cuda_scores_match_cpu(trained, packed, tmp_path, backend):
    runs = {}
    for device, be in (("cpu", "torch"), ("cuda", backend)):
        out = tmp_path / device
        assert evaluate.main(["--checkpoint", str(trained), "--data", str(packed), "--backend", be, "--workers", "1",
                              "--device", device, "--out", str(out), *(["--robustness"] if device == "cuda" else [])]) == 0
        runs[device] = {r["id"]: float(r["score"]) for r in read_scores(out / "scores.csv")}
    assert runs["cpu"].keys() == runs["cuda"].keys()
    # nvJPEG (DALI mixed) and cuDNN differ from the CPU path by a few intensity levels / float rounding
    assert max(abs(runs["cpu"][k] - runs["cuda"][k]) for k in runs["cpu"]) < 0.03
    rob = json.loads((tmp_path / "cuda" / "robustness.json").read_text())
    assert all(e["n_failed"] == 0 for v in rob["degradations"].values() for e in v["levels"])
