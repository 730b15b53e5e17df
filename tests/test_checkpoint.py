"""pipeline.checkpoint: safetensors round trip, metadata, and the clear errors."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as model_pkg
from model import create_model
from pipeline.augment.config import MEAN, STD
from pipeline.checkpoint import FORMAT, CheckpointError, load_checkpoint, read_metadata, save_checkpoint


def _trained_tiny(name="deepfakenet_tiny", **kwargs):
    torch.manual_seed(0)
    m = create_model(name, **kwargs)
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
    assert meta["model_kwargs"] == {"stem_norm": True, "input_filter": "none"}  # the filter is always recorded
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


def _rewrite(path, state=None, drop=(), **meta_changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    for key in drop:
        meta.pop(key)
    save_file(state if state is not None else load_file(str(path)), str(path), metadata=meta)


def _one_line_error(path, match, load=load_checkpoint):
    """The CheckpointError of ``load(path)``: one line, starting with the file's path."""
    with pytest.raises(CheckpointError, match=match) as e:
        load(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path)), str(e.value)
    return str(e.value)


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


# --- input_filter in the metadata -----------------------------------------------------------------

def test_input_filter_round_trips(tmp_path):
    x = torch.randn(2, 3, 33, 40)
    for name, kwargs in (("deepfakenet_npr_tiny", {}), ("deepfakenet_tiny", {"input_filter": "npr"})):
        m = _trained_tiny(name, **kwargs)
        # No model_kwargs from the caller: the model's filter is recorded anyway, since no weight shows it.
        path = save_checkpoint(tmp_path / f"{name}.safetensors", m, model_name=name, image_size=64)
        loaded, meta = load_checkpoint(path)
        assert meta["model_kwargs"] == {"input_filter": "npr"} and loaded.input_filter == "npr"
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), m(x))
    with pytest.raises(ValueError, match="input_filter='none', but the model's is 'npr'"):
        save_checkpoint(tmp_path / "x.safetensors", m, model_name="deepfakenet_tiny", image_size=64,
                        extra={"model_kwargs": {"input_filter": "none"}})


def test_old_checkpoints_load_with_no_filter(tmp_path):
    m = _trained_tiny()
    path = save_checkpoint(tmp_path / "old.safetensors", m, model_name="deepfakenet_tiny", image_size=32)
    _rewrite(path, model_kwargs="{}")  # what this module wrote before input_filter existed
    loaded, meta = load_checkpoint(path)
    assert loaded.input_filter == "none" and meta["model_kwargs"] == {}
    # The least metadata ever accepted: format, model, image_size.
    _rewrite(path, drop=("mean", "std", "epoch", "metrics", "model_kwargs"))
    loaded, meta = load_checkpoint(path)
    assert loaded.input_filter == "none" and meta["epoch"] is None and meta["image_size"] == 32
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))


# --- untrusted metadata: bounded and checked before anything is built ------------------------------

@pytest.mark.parametrize("field, value, match", [
    ("image_size", "0", r"metadata image_size='0': must be an int in \[32, 4096\]"),
    ("image_size", "-64", "image_size='-64'"),
    ("image_size", "16", "image_size='16'"),
    ("image_size", "30000", "image_size='30000'"),
    ("image_size", "64.5", "image_size='64.5'"),
    ("image_size", "abc", "image_size='abc'"),
    ("model_kwargs", '{"widths": [65536, 64, 128, 256]}', r"model_kwargs: deepfakenet_tiny: widths=\[65536"),
    ("model_kwargs", '{"stem_width": -1}', r"stem_width=-1: must be an int in \[1, 1024\]"),
    ("model_kwargs", '{"stem_norm": 1}', "stem_norm=1: must be true or false"),
    ("model_kwargs", '{"input_filter": "srm"}', "input_filter='srm': choose one of none, npr"),
    ("model_kwargs", '{"pretrained": true}', "unknown argument 'pretrained'"),
    ("model_kwargs", '{"widths": [4096, 4096, 4096, 4096], "groups": 1}', "more than MAX_PARAMS"),
    ("model_kwargs", "[1, 2]", "metadata model_kwargs='\\[1, 2\\]': must be a JSON object"),
    ("model_kwargs", '{"widths": ', "model_kwargs=.*not valid JSON \\(JSONDecodeError"),
    ("model_kwargs", "[" * 100_000, "model_kwargs=.*not valid JSON .*nested too deeply"),
    ("epoch", '"three"', "metadata epoch='\"three\"': must be null or an int"),
    ("epoch", "true", "epoch='true'"),
    ("mean", "[0.5]", "mean='\\[0.5\\]': must be a JSON list of 3 finite numbers"),
    ("mean", "[NaN, 0.4, 0.4]", "mean="),
    ("std", "[0, 0.2, 0.2]", "std=.*3 positive numbers"),
    ("metrics", "3", "metrics='3': must be a JSON object"),
    ("model", "vit_huge", "unknown model 'vit_huge'"),
])
def test_bad_metadata_is_one_line_naming_file_and_field(tmp_path, monkeypatch, field, value, match):
    path = save_checkpoint(tmp_path / "c.safetensors", _trained_tiny(), model_name="deepfakenet_tiny", image_size=32)
    _rewrite(path, **{field: value})

    def must_not_build(*args, **kwargs):
        raise AssertionError("a model was built from bad metadata")

    monkeypatch.setattr(model_pkg, "create_model", must_not_build)
    monkeypatch.setattr(model_pkg.deepfakenet.DeepfakeNet, "__init__", must_not_build)
    _one_line_error(path, match)
    _one_line_error(path, match, load=read_metadata)


@pytest.mark.parametrize("field", ["model", "image_size"])
def test_missing_required_field(tmp_path, field):
    path = save_checkpoint(tmp_path / "c.safetensors", _trained_tiny(), model_name="deepfakenet_tiny", image_size=32)
    _rewrite(path, drop=(field,))
    _one_line_error(path, f"checkpoint metadata has no '{field}' field")


# --- the weights: finite, and read only once names and shapes match --------------------------------

def test_non_finite_weights_are_refused(tmp_path):
    m = _trained_tiny()
    path = save_checkpoint(tmp_path / "c.safetensors", m, model_name="deepfakenet_tiny", image_size=32)
    state = load_file(str(path))
    state["fc.weight"][0, :3] = float("nan")
    _rewrite(path, state)
    _one_line_error(path, r"tensor fc\.weight \(1, 256\) has 3 NaN and 0 infinite values \(1 such tensors in all")
    state["stem.0.weight"][0, 0, 0, 0] = float("-inf")
    state["stages.0.0.bn1.running_var"][1] = float("inf")
    _rewrite(path, state)
    # The first bad tensor in the model's own order is named.
    _one_line_error(path, r"tensor stem\.0\.weight \(16, 3, 7, 7\) has 0 NaN and 1 infinite values \(3 such tensors")


# --- files that are not checkpoints -----------------------------------------------------------------

def test_files_that_are_not_checkpoints(tmp_path):
    good = save_checkpoint(tmp_path / "good.safetensors", _trained_tiny(), model_name="deepfakenet_tiny", image_size=32)
    data = good.read_bytes()
    cases = {
        "truncated.safetensors": data[:-100],
        "header_only.safetensors": data[:20],
        "empty.safetensors": b"",
        "pickle.safetensors": pickle.dumps({"fc.weight": [0.0] * 4}),
        "text.safetensors": b"not a checkpoint\n" * 20,
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        _one_line_error(tmp_path / name, "not a safetensors file")
    torch.save(_trained_tiny().state_dict(), tmp_path / "torch_save.safetensors")  # a pickle under the new name
    _one_line_error(tmp_path / "torch_save.safetensors", "not a safetensors file")


def test_run_dir_without_best(tmp_path):
    save_checkpoint(tmp_path / "last.safetensors", _trained_tiny(), model_name="deepfakenet_tiny", image_size=32)
    _one_line_error(tmp_path, r"run directory has no best\.safetensors \(safetensors files there: last\.safetensors\)")
