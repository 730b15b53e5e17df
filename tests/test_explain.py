"""Heat maps (issue 26): a model whose decision rests on one quadrant is shown looking there; the
explain API on every model, both input filters, frozen weights; PNGs from predict --explain for images
and crops and from the API for a batch of crops/frames; bad layer, no gradient, ONNX, unreadable files.

The quadrant models are trained here, in memory, in a few seconds: 64 px smooth random images, the
fakes with a faint 2-px checkerboard in ONE quadrant only. Two models, two quadrants: a map that
ignores the input (a fixed corner, a flipped or transposed map) fails at least one of them."""
from __future__ import annotations

import csv
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_face, write_image
from PIL import Image

from model import create_model, list_models
from pipeline import predict
from pipeline.augment.batch_ops import normalize
from pipeline.checkpoint import save_checkpoint
from pipeline.scoring.explain import Explainer, ExplainError, default_layer, explain_batch
from pipeline.scoring.explain_files import INDEX, png_name, write_explanations
from pipeline.scoring.outputs import shown

QUADRANTS = {"top-left": (0, 0), "top-right": (0, 1), "bottom-left": (1, 0), "bottom-right": (1, 1)}
SIZE = 64


def quadrant_images(rng: np.random.Generator, n: int, quadrant: str, fake: bool, size: int = SIZE) -> torch.Tensor:
    """uint8 NCHW: smooth random images; fakes carry a +-24 checkerboard in ``quadrant`` and nowhere else."""
    r, c = QUADRANTS[quadrant]
    h = size // 2
    checker = ((np.indices((h, h)).sum(0) % 2) * 2 - 1).astype(np.float32)[..., None]
    out = []
    for _ in range(n):
        img = make_face(rng, size).astype(np.float32)
        if fake:
            img[r * h:(r + 1) * h, c * h:(c + 1) * h] += 24 * checker
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def train_quadrant_model(name: str, quadrant: str, seed: int = 0, n: int = 64, steps: int = 60) -> torch.nn.Module:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.cat([quadrant_images(rng, n, quadrant, False), quadrant_images(rng, n, quadrant, True)])
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    model = create_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, 2 * n, (32,))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(normalize(x[idx])).squeeze(1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def npr_quadrant_model():
    return train_quadrant_model("deepfakenet_npr_tiny", "bottom-left")


@pytest.mark.parametrize("name,quadrant", [("deepfakenet_tiny", "top-right"), ("deepfakenet_npr_tiny", "bottom-left")])
def test_heat_map_peaks_in_the_quadrant_that_decides(name, quadrant, request):
    model = (request.getfixturevalue("npr_quadrant_model") if name == "deepfakenet_npr_tiny"
             else train_quadrant_model(name, quadrant))
    rng = np.random.default_rng(123)
    fakes, reals = quadrant_images(rng, 16, quadrant, True), quadrant_images(rng, 16, quadrant, False)
    with torch.no_grad():  # the model did learn the task, so the test is about the map, not the training
        p_fake, p_real = torch.sigmoid(model(normalize(fakes))), torch.sigmoid(model(normalize(reals)))
    assert (p_fake >= 0.5).float().mean() >= 0.9 and (p_real < 0.5).float().mean() >= 0.9

    scores, maps = explain_batch(model, normalize(fakes))  # the predicted class: fake
    assert maps.shape == (16, SIZE, SIZE) and maps.dtype == np.float32
    assert np.allclose(scores, p_fake.squeeze(1).numpy(), atol=1e-5)
    r, c = QUADRANTS[quadrant]
    h = SIZE // 2
    peaks = [np.unravel_index(m.argmax(), m.shape) for m in maps]
    in_quadrant = np.mean([(y // h, x // h) == (r, c) for y, x in peaks])
    mass = np.mean([m[r * h:(r + 1) * h, c * h:(c + 1) * h].sum() / m.sum() for m in maps])
    assert in_quadrant >= 0.85, f"maximum in the {quadrant} quadrant for only {in_quadrant:.0%} of fakes"
    assert mass >= 0.5, f"only {mass:.0%} of the heat in the {quadrant} quadrant (a flat map has 25%)"


@pytest.mark.parametrize("name", list_models())
def test_every_model_explains_a_batch_and_is_left_as_it_was(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    model.stem[0].weight.requires_grad_(False)  # a partly frozen model still explains
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(2, 3, 66, 71)  # odd width: the NPR filter drops a column; the map still covers the input
    scores, maps = explain_batch(model, x, target="fake")
    assert scores.shape == (2,) and maps.shape == (2, 66, 71)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    with torch.no_grad():
        expected = torch.sigmoid(model.eval()(x)).squeeze(1).numpy()
    model.train()
    assert np.allclose(scores, expected, atol=1e-5)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into a training run's grads


def test_default_layer_has_a_map_to_show():
    assert default_layer(create_model("deepfakenet_small"), 96) == "stages.3"  # 3x3 at 96 px: the last stage
    assert default_layer(create_model("deepfakenet_tiny"), 64) == "stages.2"  # its last stage is 2x2 there
    assert default_layer(create_model("deepfakenet_npr_tiny"), 64) == "stages.1"
    assert default_layer(create_model("deepfakenet_tiny"), 32) == "stages.1"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript ONNX exporter, as deepfake-export uses
def test_bad_layer_no_gradient_and_onnx_are_one_line(tmp_path):
    model = create_model("deepfakenet_tiny").eval()
    for bad, what in (("stages.9", "no such layer"), ("fc", "is not a layer with a spatial output")):
        with pytest.raises(ExplainError) as e:
            Explainer.for_model(model, image_size=64, layer=bad)
        assert str(e.value).startswith(f"--cam-layer {bad}: {what}") and "\n" not in str(e.value)
        assert "stages.0, stages.1, stages.2, stages.3" in str(e.value)
    with pytest.raises(ExplainError, match="--cam-method 'nope'"):
        Explainer.for_model(model, image_size=64, method="nope")
    with pytest.MonkeyPatch.context() as mp:  # the package missing: one line saying how to install it
        mp.setitem(sys.modules, "pytorch_grad_cam", None)
        with pytest.raises(ExplainError, match=r"not installed: pip install grad-cam "):
            Explainer.for_model(model, image_size=64)

    class Frozen(torch.nn.Module):  # a graph run without autograd, as a frozen/exported model is
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            with torch.no_grad():
                return self.net(x)

    with pytest.raises(ExplainError, match="no gradient reaches layer net.stages.2") as e:
        explain_batch(Frozen(), torch.randn(2, 3, 64, 64))
    assert "\n" not in str(e.value)

    ort = pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(model, torch.randn(1, 3, 64, 64), str(onnx_path), dynamo=False)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with pytest.raises(ExplainError, match="cannot explain a InferenceSession: heat maps need"):
        explain_batch(session, torch.randn(1, 3, 64, 64))


def _checkpoint(model, tmp_path: Path, name: str, preprocess: str = "resize") -> Path:
    return save_checkpoint(tmp_path / f"{name}.safetensors", model, model_name=name, image_size=SIZE,
                           extra={"preprocess": preprocess})


def _pngs(folder: Path) -> dict:
    with open(folder / INDEX, newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def test_predict_explain_writes_a_png_per_image(npr_quadrant_model, tmp_path, caplog):
    ckpt = _checkpoint(npr_quadrant_model, tmp_path, "deepfakenet_npr_tiny")
    rng = np.random.default_rng(5)
    photos = tmp_path / "photos"
    files = [write_image(photos / f"img{i}.png", quadrant_images(rng, 1, "bottom-left", i % 2 == 1)[0]
                         .permute(1, 2, 0).numpy()) for i in range(4)]
    files.append(write_image(photos / "sub" / "big face.jpg", make_face(rng, 100)))  # resized to 64
    odd = write_image(photos / os.fsdecode(b"caf\xe9\nname.png"), make_face(rng, 64))  # not UTF-8, a newline
    (photos / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "explained"
    with caplog.at_level(logging.INFO):
        rc = predict.main(["--checkpoint", str(ckpt), str(photos), "--explain", str(out), "--out",
                           str(tmp_path / "p.csv"), "--device", "cpu", "--workers", "0", "--batch-size", "2"])
    assert rc == 0
    index = _pngs(out)
    odd_row = index.pop(shown(str(odd)))  # written escaped, with its exact bytes beside it
    assert bytes.fromhex(odd_row["path_bytes_hex"]) == os.fsencode(str(odd))
    assert odd_row["png"].endswith("_caf_name.png.png") and (out / odd_row["png"]).is_file()
    assert set(index) == {str(f) for f in files}  # the unreadable file has no PNG, and said so in the log
    assert "could not read" in caplog.text and "broken.jpg" in caplog.text
    with open(tmp_path / "p.csv", newline="") as f:
        preds = {r["path"]: r for r in csv.DictReader(f)}
    for path, row in [*index.items(), (shown(str(odd)), odd_row)]:
        assert float(row["p_fake"]) == pytest.approx(float(preds[path]["p_fake"]), abs=1e-6)
        with Image.open(out / row["png"]) as im:
            assert im.format == "PNG" and im.width > 2 * 192 and im.height > 192
    assert sorted(p.name for p in out.glob("*.png")) == sorted([odd_row["png"]] + [r["png"] for r in index.values()])
    assert "wrote 6 heat-map PNGs (layer stages.1" in caplog.text


def test_predict_explain_on_crops_of_a_crop_trained_model(npr_quadrant_model, tmp_path):
    """A crop-trained model scores at native resolution (full) or on the centre crop: the map covers that."""
    ckpt = _checkpoint(npr_quadrant_model, tmp_path, "deepfakenet_npr_tiny", preprocess="crop")
    rng = np.random.default_rng(6)
    crops = [write_image(tmp_path / "faces" / f"face{i}.png", make_face(rng, s)) for i, s in enumerate((96, 80))]
    for mode in ("center", "full", "tiles"):
        out = tmp_path / f"x-{mode}"
        assert predict.main(["--checkpoint", str(ckpt), str(tmp_path / "faces"), "--explain", str(out), "--scoring",
                             mode, "--out", str(tmp_path / f"{mode}.csv"), "--device", "cpu", "--workers", "0"]) == 0
        assert set(_pngs(out)) == {str(c) for c in crops}


def test_the_api_explains_any_batch_of_crops_or_frames(npr_quadrant_model, tmp_path):
    """What a video or face stage calls: uint8 crops of any sizes with their names (e.g. a frame)."""
    rng = np.random.default_rng(8)
    views = [quadrant_images(rng, 1, "bottom-left", True)[0], quadrant_images(rng, 1, "bottom-left", False)[0],
             torch.from_numpy(make_face(rng, 48)).permute(2, 0, 1).contiguous()]
    names = ["clip.mp4 frame 12 (highest)", "clip.mp4 frame 40 (lowest)", "photo.jpg face 1"]
    explainer = Explainer.for_model(npr_quadrant_model, image_size=SIZE)
    paths = write_explanations(explainer, views, names, tmp_path / "video", labels=[1, 1, 0])
    assert [p.name for p in paths] == [png_name(i, n) for i, n in enumerate(names)]
    assert paths[0].name == "00000_clip.mp4_frame_12_highest.png"
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG"


def test_predict_explain_errors_are_one_line(trained, image_dirs, tmp_path, caplog):
    real, _ = image_dirs
    out = str(tmp_path / "x")
    common = [str(real), "--explain", out, "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "p.csv")]
    caplog.clear()
    assert predict.main(["--checkpoint", str(trained), *common, "--cam-layer", "stages.7"]) == 2
    errors = [r.message for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "--cam-layer stages.7: no such layer" in errors[0] and "stages.3" in errors[0]
    assert not Path(out).exists() and not (tmp_path / "p.csv").exists()  # refused before any work

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")  # checked by name, before anything is read
    caplog.clear()
    assert predict.main(["--checkpoint", str(onnx), *common]) == 2
    assert "an ONNX export has no gradients" in caplog.text and "\n" not in caplog.records[-1].message

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    caplog.clear()
    assert predict.main(["--checkpoint", str(trained), str(real), "--explain", str(a_file), "--device", "cpu"]) == 2
    assert f"--explain {a_file}: is a file, not a folder" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_heat_maps_match_cpu_and_survive_bf16(npr_quadrant_model, tmp_path):
    rng = np.random.default_rng(9)
    x = normalize(quadrant_images(rng, 8, "bottom-left", True))
    cpu_scores, cpu_maps = explain_batch(npr_quadrant_model, x)
    model = npr_quadrant_model.to("cuda")
    try:
        scores, maps = explain_batch(model, x.to("cuda"))
        assert np.allclose(scores, cpu_scores, atol=1e-3) and np.abs(maps - cpu_maps).max() < 0.05
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as under `accelerate launch --mixed_precision bf16`
            _, bf16_maps = explain_batch(model, x.to("cuda"))
        assert np.isfinite(bf16_maps).all() and np.abs(bf16_maps - cpu_maps).mean() < 0.1
    finally:
        npr_quadrant_model.to("cpu")
