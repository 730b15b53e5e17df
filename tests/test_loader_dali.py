"""DALI loader backend on real shards made by the real packer (CPU pipeline, device_id=None)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch

pytest.importorskip("nvidia.dali")

from pipeline.augment.config import MEAN, STD, AugConfig
from pipeline.data.contract import LoaderSpec, drop_repeats
from pipeline.data.loader import build_loader
from pipeline.data.shards import DataError

pytestmark = pytest.mark.timeout(180)

SIZE = 48  # the packed fixture's images are 48x48: the warp is then exact when no transform is drawn


def load(data, split="val", *, train=False, aug="none", batch_size=4, image_size=SIZE, rank=0, world_size=1,
         seed=0, device="cpu"):
    return build_loader(LoaderSpec(
        data, split, backend="dali", device=device, batch_size=batch_size, image_size=image_size, train=train,
        aug=aug, rank=rank, world_size=world_size, seed=seed, num_workers=1,
    ))


def run(loader) -> Dict[str, list]:
    """One pass: concatenated images, labels, ids, and the batch count."""
    images, labels, ids, n = [], [], [], 0
    for batch in loader:
        images.append(batch.images)
        labels += batch.labels.tolist()
        ids += batch.ids
        n += 1
    return {"images": torch.cat(images), "labels": labels, "ids": ids, "steps": n}


def folder_labels(packed: Path) -> Dict[str, int]:
    """id -> label from the packer's *input* folders (key = sha256 of the file bytes, 32 hex)."""
    out = {}
    for label, name in ((0, "real"), (1, "fake")):
        for path in (packed.parent / "images" / name).glob("*.jpg"):
            out[hashlib.sha256(path.read_bytes()).hexdigest()[:32]] = label
    assert len(out) == 80
    return out


def split_ids(packed: Path, split: str) -> Set[str]:
    manifest = json.loads((packed / "manifest.json").read_text())
    ids = set()
    for entry in manifest["splits"][split]["shards"]:
        with tarfile.open(packed / entry["name"]) as tf:
            ids |= {Path(name).stem for name in tf.getnames()}
    assert len(ids) == manifest["splits"][split]["num_samples"]
    return ids


def by_id(result) -> Dict[str, torch.Tensor]:
    return {key: result["images"][i] for i, key in enumerate(result["ids"])}


@pytest.fixture(scope="module")
def eval_pass(packed):
    loader = load(packed, "val", batch_size=4)
    return loader, run(loader)


@pytest.fixture(scope="module")
def train_plain(packed):
    """The train split with no augmentation, as reference pixels by id."""
    return by_id(run(load(packed, "train", train=False, batch_size=8)))


def test_eval_shapes_dtypes_ranges(eval_pass):
    loader, out = eval_pass
    batch = next(iter(loader))
    assert batch.images.shape == (4, 3, SIZE, SIZE) and batch.images.dtype == torch.float32
    assert batch.labels.shape == (4,) and batch.labels.dtype == torch.float32
    assert batch.images.device.type == "cpu" and batch.labels.device.type == "cpu"
    assert all(isinstance(k, str) and len(k) == 32 for k in batch.ids)
    lo = min((0 - m) / s for m, s in zip(MEAN, STD))
    hi = max((1 - m) / s for m, s in zip(MEAN, STD))
    assert lo - 1e-4 <= out["images"].min().item() < 0 < out["images"].max().item() <= hi + 1e-4
    assert out["images"].std().item() > 0.1
    assert out["steps"] == len(loader) == 5  # 18 samples, batch 4, last batch padded


def test_eval_every_id_once_and_labels_from_folders(packed, eval_pass):
    loader, out = eval_pass
    ids, labels = drop_repeats(out["ids"], out["labels"])
    assert set(ids) == split_ids(packed, "val") and len(ids) == loader.num_samples == 18
    truth = folder_labels(packed)
    assert labels == [float(truth[k]) for k in ids]
    assert {0.0, 1.0} <= set(labels)
    assert len(out["ids"]) - len(ids) == 2  # padding repeats only fill the last batch


def test_eval_matches_torchvision_resize(packed, eval_pass):
    """The eval path is decode + bilinear antialiased resize + normalise (pipeline.augment.config)."""
    from torchvision.io import ImageReadMode, decode_image

    from pipeline.augment.batch_ops import normalize, resize_uint8

    encoded = {}
    for tar in sorted(packed.glob("val-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    encoded[Path(m.name).stem] = bytearray(tf.extractfile(m).read())
    for size in (32, 80):
        out = run(load(packed, "val", batch_size=9, image_size=size))
        for key, image in list(by_id(out).items())[:6]:
            raw = decode_image(torch.frombuffer(encoded[key], dtype=torch.uint8), mode=ImageReadMode.RGB)
            ref = normalize(resize_uint8(raw, size)[None])[0]
            levels = (ref - image).abs() * 255 * max(STD)
            assert levels.max().item() <= 3.0 and levels.mean().item() < 0.5, (size, key)


@pytest.mark.parametrize("world_size", [2, 4])
def test_eval_split_over_ranks(packed, world_size):
    loaders = [load(packed, "val", batch_size=4, rank=r, world_size=world_size) for r in range(world_size)]
    outs = [run(ld) for ld in loaders]
    assert len({len(ld) for ld in loaders}) == 1
    assert all(o["steps"] == len(loaders[0]) for o in outs)
    parts = [set(drop_repeats(o["ids"])[0]) for o in outs]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == 18  # no overlap, complete
    assert set().union(*parts) == split_ids(packed, "val")
    assert [ld.num_samples for ld in loaders] == [len(p) for p in parts]


def test_train_ranks_disjoint_equal_steps(packed):
    loaders = [load(packed, "train", train=True, aug="seed", batch_size=4, rank=r, world_size=2) for r in range(2)]
    outs = [run(ld) for ld in loaders]
    assert len(loaders[0]) == len(loaders[1]) == 7  # 62 samples -> 31 per rank -> 7 full batches of 4
    for ld, out in zip(loaders, outs):
        assert out["steps"] == len(ld) and len(out["ids"]) == ld.num_samples == 28
        assert len(set(out["ids"])) == len(out["ids"])  # no id twice within an epoch on a rank
    assert not set(outs[0]["ids"]) & set(outs[1]["ids"])
    truth = folder_labels(packed)
    for out in outs:
        assert out["labels"] == [float(truth[k]) for k in out["ids"]]


def test_train_order_per_epoch_deterministic(packed):
    loader = load(packed, "train", train=True, aug="seed", batch_size=8, seed=3)
    first = run(loader)
    loader.set_epoch(1)
    second = run(loader)
    assert first["ids"] != second["ids"]
    again = load(packed, "train", train=True, aug="seed", batch_size=8, seed=3)
    replay = run(again)
    assert replay["ids"] == first["ids"]
    assert torch.equal(replay["images"], first["images"])  # same augmentation too
    again.set_epoch(1)
    assert run(again)["ids"] == second["ids"]
    other_seed = run(load(packed, "train", train=True, aug="seed", batch_size=8, seed=4))
    assert other_seed["ids"] != first["ids"]


def test_augmentation_changes_pixels_not_labels(packed, train_plain):
    aug = AugConfig.preset("robust", apply_prob=1.0)
    out = run(load(packed, "train", train=True, aug=aug, batch_size=8))
    truth = folder_labels(packed)
    assert out["labels"] == [float(truth[k]) for k in out["ids"]]
    diffs = [(image - train_plain[k]).abs().mean().item() for k, image in by_id(out).items()]
    assert min(diffs) > 0.01


def _flipped(out, plain) -> List[bool]:
    flags = []
    for key, image in by_id(out).items():
        ref = plain[key]
        if torch.allclose(image, ref, atol=1e-4):
            flags.append(False)
        else:
            assert torch.allclose(image, ref.flip(-1), atol=1e-4), key
            flags.append(True)
    return flags


def test_per_sample_flip(packed, train_plain):
    out = run(load(packed, "train", train=True, aug=AugConfig(hflip=0.5), batch_size=16))
    first_batch = _flipped({"images": out["images"][:16], "ids": out["ids"][:16]}, train_plain)
    assert any(first_batch) and not all(first_batch)  # drawn per sample, not once per batch
    ranks = [run(load(packed, "train", train=True, aug=AugConfig(hflip=0.5), batch_size=16, rank=r, world_size=2))
             for r in range(2)]
    patterns = [_flipped(out, train_plain) for out in ranks]
    assert patterns[0] != patterns[1]  # ranks with the same seed still draw their own transforms


def test_per_sample_brightness(packed, train_plain):
    out = run(load(packed, "train", train=True, aug=AugConfig(brightness=(0.6, 1.0)), batch_size=16))
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    factors = []
    for key, image in list(by_id(out).items())[:16]:
        pix, ref = image * std + mean, train_plain[key] * std + mean
        factors.append((pix.sum() / ref.sum()).item())
    assert all(0.55 < f < 1.02 for f in factors)
    assert torch.tensor(factors).std().item() > 0.03


@pytest.mark.parametrize("field", ["blur_prob", "jpeg_prob"])
def test_blur_and_jpeg_gated_per_sample(packed, train_plain, field):
    aug = AugConfig(apply_prob=0.0, **{field: 0.5})
    out = run(load(packed, "train", train=True, aug=aug, batch_size=16))
    changed = [not torch.allclose(image, train_plain[k], atol=1e-4) for k, image in by_id(out).items()]
    assert any(changed) and not all(changed)


def test_brace_pattern_input(packed):
    out = run(load(f"{packed}/val-{{000000..000001}}.tar", "val", batch_size=4))
    assert set(drop_repeats(out["ids"])[0]) == split_ids(packed, "val")


def test_truncated_shard_named(packed_copy):
    data = packed_copy
    tar = data / "val-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(DataError, match=r"val-000001\.tar.*truncated.*--verify"):
        load(data, "val")


def test_shard_truncated_after_build_named(packed_copy):
    """A shard that shrinks after the loader was built: DALI's read error, re-raised naming the file."""
    data = packed_copy
    loader = load(data, "val")
    tar = data / "val-000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"val-000001\.tar.*--verify"):
        run(loader)


def _drop_sha(data, name: str) -> None:
    """Leave the shard's SHA-256 out of the manifest: the shard-level hash would catch any change before the
    per-sample checks these tests are about (tests/test_resume_edges.py tests it)."""
    import json

    m = json.loads((data / "manifest.json").read_text())
    for info in m["splits"].values():
        for e in info["shards"]:
            if e["name"] == name:
                e.pop("sha256")
    (data / "manifest.json").write_text(json.dumps(m))


def test_undecodable_sample_refused_before_dali_reads_it(packed_copy):
    """DALI's CPU decoder crashes the process (SIGSEGV) on a bad sample in a large batch: the loader
    checks every sample when it is built, so DALI never sees one."""
    data = packed_copy
    tar = data / "val-000000.tar"
    raw = bytearray(tar.read_bytes())
    start = raw.index(b"\xff\xd8\xff")  # first JPEG in the shard: keep its size, wreck its contents
    raw[start + 2:start + 600] = bytes(598)
    tar.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"val-000000\.tar: its SHA-256 differs from the manifest's.*--verify"):
        load(data, "val", batch_size=64)
    _drop_sha(data, "val-000000.tar")
    with pytest.raises(DataError, match=r"val-000000\.tar: [0-9a-f]{32}\.jpg: the image bytes do not match.*--verify"):
        load(data, "val", batch_size=64)


def test_swapped_index_refused(packed_copy):
    data = packed_copy
    a, b = data / "val-000000.idx", data / "val-000001.idx"
    text_a, text_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(text_b)
    b.write_bytes(text_a)
    with pytest.raises(DataError, match=r"val-000000\.idx: \d+ of \d+ sample lines do not match the members of "
                                        r"val-000000\.tar.*wds2idx"):
        load(data, "val", batch_size=64)


def test_unverifiable_image_must_decode(packed_copy, monkeypatch):
    """An image no SHA-256 vouches for (normalised PNG, or a foreign shard without json) is decoded."""
    from pipeline.data import dali_backend

    data = packed_copy
    monkeypatch.setattr(dali_backend, "_hash_checked", lambda sample: False)
    load(data, "val")  # every packed image decodes
    tar = data / "val-000001.tar"
    raw = bytearray(tar.read_bytes())
    start = raw.index(b"\xff\xd8\xff")
    raw[start:start + 600] = bytes(600)
    tar.write_bytes(bytes(raw))
    _drop_sha(data, "val-000001.tar")
    monkeypatch.setattr("pipeline.data.dali_backend.check_sample", lambda sample, hint: ("jpg", 0))
    with pytest.raises(DataError, match=r"val-000001\.tar: sample [0-9a-f]{32}\.jpg does not decode"):
        load(data, "val")


def test_missing_index_named(packed_copy):
    data = packed_copy
    (data / "train-000002.idx").unlink()
    with pytest.raises(DataError, match=r"train-000002\.idx.*missing"):
        load(data, "train", train=True)


def test_too_few_samples_for_batch(packed):
    with pytest.raises(ValueError, match="--batch-size"):
        load(packed, "train", train=True, batch_size=64)


def test_import_without_dali_loaded():
    code = "import sys, pipeline.data.loader, pipeline.data.dali_backend; sys.exit('nvidia.dali' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_missing_dali_suggests_torch_backend(packed, monkeypatch):
    monkeypatch.delitem(sys.modules, "pipeline.data.dali_graph", raising=False)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    with pytest.raises(ValueError, match="--backend torch"):
        load(packed, "val")


@pytest.mark.gpu
def test_gpu_mixed_decode_and_augment(packed):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = run(load(packed, "val", device="cuda", batch_size=4))
    assert out["images"].device.type == "cuda"
    cpu = by_id(run(load(packed, "val", batch_size=4)))
    for key, image in by_id(out).items():
        assert (image.cpu() - cpu[key]).abs().max().item() * 255 * max(STD) <= 6.0  # nvJPEG vs libjpeg
    loader = load(packed, "train", train=True, aug="robust", device="cuda", batch_size=8)
    batch = next(iter(loader))
    assert batch.images.is_cuda and batch.labels.is_cuda and batch.images.shape == (8, 3, SIZE, SIZE)
    truth = folder_labels(packed)
    assert batch.labels.tolist() == [float(truth[k]) for k in batch.ids]
