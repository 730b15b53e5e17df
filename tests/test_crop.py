"""Keeping the pixels: native-resolution crops (``preprocess='crop'``), scoring modes, NPR end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_face, pack_dirs, write_image

from pipeline.augment.config import AugConfig
from pipeline.augment.crop import crop, crops_into, pad_to
from pipeline.augment.params import crop_offset, draw_params
from pipeline.augment.uint8_ops import process_into
from pipeline.data.contract import LoaderSpec
from pipeline.data.loader import build_loader
from pipeline.scoring.modes import score_items, tile_offsets, views


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_even_offsets_cover_the_range():
    assert [crop_offset(10, f) for f in (0.0, 0.3, 0.99)] == [0, 2, 10]
    assert crop_offset(9, 0.99) == 8 and crop_offset(0, 0.5) == 0 and crop_offset(7, None) == 4
    assert all(crop_offset(37, f / 100) % 2 == 0 for f in range(100))


def test_crop_is_the_source_pixels():
    image = _image(70, 90)
    out = np.empty((4, 32, 32, 3), np.uint8)
    params = draw_params(4, AugConfig.preset("none", preprocess="crop"), torch.Generator().manual_seed(3))
    crops_into([image] * 4, out, params)
    for slot in out:  # each crop is found in the image, at even offsets
        hits = [(y, x) for y in range(0, 39, 2) for x in range(0, 59, 2) if np.array_equal(image[y:y + 32, x:x + 32], slot)]
        assert hits
    centre = crop(image, 32)
    assert np.array_equal(centre, image[20:52, 30:62])  # (70-32)//2 = 19 -> even 20; (90-32)//2 = 29 -> 30


def test_small_images_are_padded_never_upsampled():
    image = _image(20, 26)
    padded = pad_to(image, 32)
    assert padded.shape[:2] == (32, 32)
    top, left = 6, 4  # even amounts before the image: the 2x2 grid keeps its parity
    assert np.array_equal(padded[top:top + 20, left:left + 26], image)
    tiny = pad_to(_image(3, 2), 32)  # several rounds of reflection, then the edge
    assert tiny.shape[:2] == (32, 32)


def test_artifact_training_without_downscale_never_resamples():
    """With flips only (no down-scaling, blur or JPEG drawn), every output pixel is a source pixel."""
    cfg = AugConfig.preset("artifact", downscale_prob=0.0, blur_prob=0.0, jpeg_prob=0.0)
    image = _image(64, 64, 1)
    out = np.empty((8, 32, 32, 3), np.uint8)
    params = draw_params(8, cfg, torch.Generator().manual_seed(0))
    process_into([image] * 8, out, params, crop=True)
    windows = {image[y:y + 32, x:x + 32][:, ::s].tobytes() for y in range(0, 33, 2) for x in range(0, 33, 2)
               for s in (1, -1)}
    assert all(slot.tobytes() in windows for slot in out)
    assert any(bool(f) for f in params.hflip.tolist())


def test_loader_crop_mode_eval_is_the_centre_crop(tmp_path):
    rng = np.random.default_rng(0)
    real, fake = tmp_path / "real", tmp_path / "fake"
    for i in range(6):
        write_image(real / f"r{i}.png", make_face(rng, 64))
        write_image(fake / f"f{i}.png", make_face(rng, 64, fake=True))
    packed = pack_dirs(real, fake, tmp_path / "pack", "--shard-size", "4", "--min-shards", "1", "--val-fraction", "0.5")
    spec = LoaderSpec(str(packed), "val", train=False, backend="torch", batch_size=4, image_size=32, num_workers=0,
                      aug=AugConfig.preset("none", preprocess="crop"))
    from pipeline.augment.config import MEAN, STD
    from pipeline.data.folders import read_item, shard_items
    from shard_tools.imageio import load_rgb

    items = {it.path: it for it in shard_items(build_loader(spec).shardset.shards)}
    for batch in build_loader(spec):
        for key, x in zip(batch.ids, batch.images):
            pixels = (x.permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)) * 255
            want = crop(load_rgb(read_item(items[key])), 32)
            assert np.abs(pixels - want).max() < 0.51  # exact up to the float normalisation


def test_tiles_cover_the_image_at_even_offsets():
    assert tile_offsets(100, 32) == [0, 22, 44, 68]
    assert tile_offsets(32, 32) == [0] and tile_offsets(20, 32) == [0]
    image = _image(100, 70)
    assert [tuple(v.shape) for v in views(image, "tiles", 32)] == [(3, 32, 32)] * 12
    assert tuple(views(image, "full", 32)[0].shape) == (3, 100, 70)
    assert tuple(views(_image(41, 57), "full", 32)[0].shape) == (3, 40, 56)  # odd sides lose a row / column
    assert tuple(views(image, "resize", 32)[0].shape) == tuple(views(image, "center", 32)[0].shape) == (3, 32, 32)


@pytest.mark.parametrize("mode", ["resize", "center", "full", "tiles"])
def test_every_scoring_mode_on_a_folder_of_mixed_sizes(tmp_path, mode):
    from model import create_model
    from pipeline.data.folders import collect

    rng = np.random.default_rng(1)
    for i, size in enumerate((32, 48, 61, 100, 130)):
        write_image(tmp_path / "imgs" / f"{i}.png", make_face(rng, size))
    items, _ = collect([tmp_path / "imgs"], label=0)
    torch.manual_seed(0)
    model = create_model("deepfakenet_tiny", input_filter="npr").eval()
    scores, errors = score_items(model, items, image_size=32, mode=mode, batch_size=3, progress=False)
    assert not errors and np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
    if mode == "full":  # batching by size changes nothing: one at a time gives the same scores
        single, _ = score_items(model, items, image_size=32, mode=mode, batch_size=1, progress=False)
        assert np.allclose(scores, single, atol=1e-6)


def test_npr_checkpoint_scores_the_same_in_evaluate_and_onnx(packed, tmp_path):
    """NPR sits inside the model: a checkpoint trained with --input-filter npr, scored by evaluate,
    and its ONNX export give the same P(fake)."""
    import onnxruntime as ort

    from pipeline import evaluate, export
    from pipeline.checkpoint import load_checkpoint
    from pipeline.train import main as train_main

    run = tmp_path / "run"
    assert train_main(["--data", str(packed), "--out", str(run), "--cpu", "--model", "deepfakenet_tiny",
                       "--input-filter", "npr", "--aug", "artifact", "--image-size", "32", "--batch-size", "8",
                       "--epochs", "1", "--workers", "0", "--backend", "torch"]) == 0
    model, meta = load_checkpoint(run)
    assert meta["preprocess"] == "crop" and model.input_filter == "npr"
    assert evaluate.main(["--checkpoint", str(run), "--data", str(packed), "--device", "cpu", "--workers", "0",
                          "--scoring", "center", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["scoring"] == "center"
    assert export.main(["--checkpoint", str(run), "--onnx", str(tmp_path / "m.onnx"), "--dynamic-batch"]) == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = torch.sigmoid(model(x)).numpy().ravel()
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = sess.run(["p_fake"], {"image": x.numpy()})[0].ravel()
    assert np.allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------- both backends
def _mixed_size_pack(tmp_path):
    """PNG faces (exact decode in both backends) of sizes above and below a 32 px crop, odd and even."""
    rng = np.random.default_rng(0)
    real, fake = tmp_path / "real", tmp_path / "fake"
    for i, s in enumerate((64, 71, 20, 40, 33, 90)):
        write_image(real / f"r{i}.png", make_face(rng, s))
        write_image(fake / f"f{i}.png", make_face(rng, s + 1, fake=True))
    return pack_dirs(real, fake, tmp_path / "pack", "--shard-size", "4", "--min-shards", "1", "--val-fraction", "0.5",
                     "--min-size", "8")


def _pixels(x: torch.Tensor) -> np.ndarray:
    from pipeline.augment.config import MEAN, STD

    return np.rint((x.permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)) * 255)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_both_backends_crop_source_pixels_at_even_offsets_and_pad_small_images(tmp_path, backend):
    """Eval: the centre crop (of the reflection-padded image when it is smaller), exactly; train
    (flips, down-scaling, blur and JPEG off): a window of the padded image at even offsets, exactly."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from pipeline.data.folders import read_item, shard_items
    from shard_tools.imageio import load_rgb

    packed = _mixed_size_pack(tmp_path)
    no_resampling = AugConfig.preset("artifact", downscale_prob=0.0, blur_prob=0.0, jpeg_prob=0.0, hflip=0.0)
    seen = set()
    for split, train, aug in (("val", False, AugConfig.preset("none", preprocess="crop")), ("train", True, no_resampling)):
        spec = LoaderSpec(str(packed), split, train=train, backend=backend, batch_size=2, image_size=32, num_workers=1,
                          aug=aug)
        loader = build_loader(spec)
        items = {it.path: it for it in shard_items(loader.shardset.shards)}
        for batch in loader:
            for key, x in zip(batch.ids, batch.images):
                src, got = load_rgb(read_item(items[key])), _pixels(x)
                seen.add((split, min(src.shape[:2]) < 32))
                padded = pad_to(src, 32)
                if not train:
                    assert np.array_equal(got, crop(src, 32)), (backend, key, src.shape)
                    continue
                hits = [(y, x0) for y in range(0, padded.shape[0] - 31) for x0 in range(0, padded.shape[1] - 31)
                        if np.array_equal(padded[y:y + 32, x0:x0 + 32], got)]
                assert hits and all(y % 2 == 0 and x0 % 2 == 0 for y, x0 in hits[:1]), (backend, key, src.shape, hits)
    assert ("val", True) in seen or ("train", True) in seen  # a small image was padded


@pytest.mark.timeout(240)
def test_dali_artifact_training_runs_with_every_op(tmp_path):
    """Down-scaling (random interpolation), flips, blur and JPEG all drawn: batches of the right shape."""
    pytest.importorskip("nvidia.dali")
    packed = _mixed_size_pack(tmp_path)
    aug = AugConfig.preset("artifact", downscale_prob=0.9, blur_prob=0.5, jpeg_prob=0.5)
    spec = LoaderSpec(str(packed), "train", train=True, backend="dali", batch_size=2, image_size=32, aug=aug)
    batches = list(build_loader(spec))
    assert batches and all(tuple(b.images.shape) == (2, 3, 32, 32) and torch.isfinite(b.images).all() for b in batches)


@pytest.mark.gpu
@pytest.mark.timeout(240)
def test_dali_crop_on_cuda_matches_the_cpu_pipeline(tmp_path):
    """nvJPEG is not in play (PNG samples): the GPU graph's centre crops equal the CPU graph's."""
    pytest.importorskip("nvidia.dali")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    packed = _mixed_size_pack(tmp_path)
    out = {}
    for device in ("cpu", "cuda"):
        spec = LoaderSpec(str(packed), "val", train=False, backend="dali", device=device, batch_size=2, image_size=32,
                          aug=AugConfig.preset("none", preprocess="crop"))
        out[device] = {k: _pixels(x.cpu()) for b in build_loader(spec) for k, x in zip(b.ids, b.images)}
    assert out["cpu"].keys() == out["cuda"].keys()
    assert all(np.abs(out["cpu"][k] - out["cuda"][k]).max() <= 1 for k in out["cpu"])
