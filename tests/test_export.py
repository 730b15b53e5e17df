"""export: ONNX graph (image -> logit, p_fake) matches PyTorch under onnxruntime; CLI errors."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import help_text, make_face

from model import create_model
from pipeline import export
from pipeline.augment.batch_ops import normalize, resize_uint8
from pipeline.checkpoint import load_checkpoint


def real_batch(n: int, size: int) -> torch.Tensor:
    rng = np.random.default_rng(11)
    imgs = [torch.from_numpy(make_face(rng, 56, fake=i % 2 == 0)).permute(2, 0, 1) for i in range(n)]
    return normalize(torch.stack([resize_uint8(x, size) for x in imgs]))


def test_dynamic_batch_matches_pytorch(trained, tmp_path):
    path = tmp_path / "m.onnx"
    assert export.main(["--checkpoint", str(trained), "--onnx", str(path), "--dynamic-batch"]) == 0
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logit", "p_fake"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["model"] == "deepfakenet_tiny" and meta["image_size"] == "48"
    model, _ = load_checkpoint(trained)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = real_batch(n, 48)
        logit, p_fake = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            want = model(x)[:, 0].numpy()
        assert logit.shape == p_fake.shape == (n,)
        np.testing.assert_allclose(logit, want, atol=1e-4)
        np.testing.assert_allclose(p_fake, 1 / (1 + np.exp(-want)), atol=1e-5)
    assert not list(tmp_path.glob(".tmp-*"))


def test_fixed_batch_other_size(trained, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "fixed.onnx"
    rc = export.main(["--checkpoint", str(trained / "best.safetensors"), "--onnx", str(path), "--image-size", "64",
                      "--batch-size", "2", "--opset", "13"])
    assert rc == 0
    assert "max abs diff logit" in caplog.text
    proto = onnx.load(str(path))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 64, 64]
    assert proto.opset_import[0].version == 13
    model, _ = load_checkpoint(trained)
    x = real_batch(2, 64)
    logit, _ = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logit, model(x)[:, 0].numpy(), atol=1e-4)


def test_mismatch_above_tolerance_writes_nothing(trained, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(export, "compare_onnx", lambda *a, **k: {"logit": 0.3, "p_fake": 0.07})
    path = tmp_path / "m.onnx"
    assert export.main(["--checkpoint", str(trained), "--onnx", str(path)]) == 1
    assert "differs from PyTorch by 0.3" in caplog.text
    assert not path.exists() and not list(tmp_path.glob(".tmp-*"))


def test_cli_errors(tmp_path, caplog, capsys):
    text = help_text(export.main, capsys)
    for flag in ("--checkpoint", "--onnx", "--image-size", "--dynamic-batch", "--batch-size", "--opset", "--tolerance"):
        assert flag in text
    assert export.main(["--checkpoint", str(tmp_path / "x.safetensors"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "x.safetensors: no such checkpoint" in caplog.text
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", "x", "--onnx", str(tmp_path / "m.onnx"), "--image-size", "16"])
    assert e.value.code == 2
    assert "--image-size 16" in capsys.readouterr().err


@pytest.mark.parametrize("size", [64, 65])
def test_npr_model_matches_pytorch_in_onnxruntime(size):
    # The NPR filter is inside forward, so it is in the graph; an odd side exercises its crop.
    torch.manual_seed(0)
    model = create_model("deepfakenet_npr_tiny").eval()
    with torch.no_grad():  # non-trivial BN statistics, so the check is not of an all-zero branch
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
    data = export.export_onnx(model, image_size=size, dynamic_batch=True)
    x = torch.cat([real_batch(2, size), torch.randn(1, 3, size, size)])
    diffs = export.compare_onnx(data, model, x)
    assert max(diffs.values()) < 1e-4, diffs
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert "Resize" in ops and "Sub" in ops  # the filter is in the graph, not folded away
    with torch.no_grad():
        assert model(x).abs().max() > 0
