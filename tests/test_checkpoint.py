"""pipeline.checkpoint: safetensors round trip, metadata, and the clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import create_model
from pipeline.augment.config import MEAN, STD
from pipeline.checkpoint import FORMAT, CheckpointError, load_checkpoint, read_metadata, save_checkpoint


def _trained_tiny(**kwargs):
    torch.manual_seed(0)
    m = create_model("deepfakenet_tiny", **kwargs)
    m.train()
    with torch.no_grad():
        m(torch.randn(4, 3, 32, 32))  # moves the BN running stats away from their init
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m.eval()


def test_round_trip_gives_identical_outputs(tmp_path):
    m = _trained_tiny()
    path = save_checkpoint(tmp_path / "best.safetensors", m, model_name="deepfakenet_tiny", image_size=48,
                           extra={"epoch": 3, "metrics": {"val_auc": 0.9, "val_eer": float("nan")}, "note": "x"})
    loaded, meta = load_checkpoint(tmp_path)  # a run dir resolves to best.safetensors
    assert meta["model"] == "deepfakenet_tiny" and meta["image_size"] == 48 and meta["epoch"] == 3
    assert meta["mean"] == list(MEAN) and meta["std"] == list(STD)
    assert meta["metrics"] == {"val_auc": 0.9, "val_eer": None}
    assert meta["format"] == FORMAT and meta["note"] == "x" and meta["path"] == str(path)
    assert not loaded.training
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    assert not list(tmp_path.glob(".tmp-*"))


def test_metadata_is_all_strings_and_no_pickle(tmp_path):
    from safetensors import safe_open

    path = save_checkpoint(tmp_path / "c.safetensors", _trained_tiny(), model_name="deepfakenet_tiny", image_size=32)
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    assert all(isinstance(v, str) for v in raw.values())
    assert {"format", "model", "image_size", "mean", "std", "epoch", "metrics"} <= set(raw)
    assert json.loads(raw["mean"]) == list(MEAN)


def test_model_kwargs_round_trip(tmp_path):
    m = _trained_tiny(stem_norm=True)
    save_checkpoint(tmp_path / "c.safetensors", m, model_name="deepfakenet_tiny", image_size=32,
                    extra={"model_kwargs": {"stem_norm": True}})
    loaded, meta = load_checkpoint(tmp_path / "c.safetensors")
    assert meta["model_kwargs"] == {"stem_norm": True}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))


def test_wrapped_model_is_unwrapped(tmp_path):
    m = _trained_tiny()
    wrapped = torch.nn.DataParallel(m)
    save_checkpoint(tmp_path / "c.safetensors", wrapped, model_name="deepfakenet_tiny", image_size=32)
    assert not any(k.startswith("module.") for k in load_file(str(tmp_path / "c.safetensors")))


def test_missing_file_and_run_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="has no best.safetensors"):
        load_checkpoint(tmp_path)


def test_not_safetensors(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match=r"model\.pt: not a safetensors file"):
        load_checkpoint(bad)


def test_foreign_safetensors(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="format is 'pt'"):
        read_metadata(path)


def _rewrite(path, state=None, **meta_changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    save_file(state if state is not None else load_file(str(path)), str(path), metadata=meta)


def test_unknown_model(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _trained_tiny(), model_name="deepfakenet_tiny", image_size=32)
    _rewrite(path, model="vit_huge")
    with pytest.raises(CheckpointError, match="unknown model 'vit_huge'"):
        load_checkpoint(path)


def test_missing_unexpected_and_shape_mismatch(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _trained_tiny(), model_name="deepfakenet_tiny", image_size=32)
    state = load_file(str(path))
    state.pop("fc.weight")
    state["extra.weight"] = torch.zeros(1)
    _rewrite(path, state)
    with pytest.raises(CheckpointError, match=r"missing keys fc\.weight, unexpected keys extra\.weight"):
        load_checkpoint(path)

    path2 = save_checkpoint(tmp_path / "d.safetensors", _trained_tiny(), model_name="deepfakenet_tiny", image_size=32)
    _rewrite(path2, model="deepfakenet_small")
    with pytest.raises(CheckpointError, match=r"d\.safetensors: weights do not match deepfakenet_small: missing keys stages"):
        load_checkpoint(path2)
    state = load_file(str(path2))
    state["fc.weight"] = torch.zeros(1, 7)
    _rewrite(path2, state, model="deepfakenet_tiny")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*fc\.weight \(1, 7\) vs model \(1, 256\)"):
        load_checkpoint(path2)
