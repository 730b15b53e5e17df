"""pipeline.data.torch_backend on real packed shards (the `packed` fixture): ids, labels, ranks, errors."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import tarfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from helpers import make_face, make_image_dirs, pack_dirs, write_image

from pipeline.augment.batch_ops import normalize, resize_uint8
from pipeline.augment.config import MEAN, STD, AugConfig
from pipeline.data.contract import LoaderSpec, drop_repeats
from pipeline.data.loader import build_loader
from pipeline.data.shards import DataError
from pipeline.data.torch_backend import TorchLoader

SIZE = 32
LOW = min((0 - m) / s for m, s in zip(MEAN, STD))
HIGH = max((1 - m) / s for m, s in zip(MEAN, STD))


def folder_labels(images_root: Path) -> Dict[str, int]:
    """key -> label from the source folders themselves (key = sha256 of the file, 32 hex chars)."""
    labels = {}
    for name, label in (("real", 0), ("fake", 1)):
        for path in (images_root / name).iterdir():
            labels[hashlib.sha256(path.read_bytes()).hexdigest()[:32]] = label
    return labels


def split_ids(packed: Path, split: str) -> List[str]:
    manifest = json.loads((packed / "manifest.json").read_text())
    ids = []
    for entry in manifest["splits"][split]["shards"]:
        with tarfile.open(packed / entry["name"]) as tar:
            ids += [m.name[: -len(".cls")] for m in tar if m.name.endswith(".cls")]
    return ids


def loader(data, split, *, train, rank=0, world_size=1, workers=0, seed=0, aug=None, batch_size=8) -> TorchLoader:
    aug = aug or AugConfig.preset("seed" if train else "none")
    return build_loader(LoaderSpec(data, split, device="cpu", batch_size=batch_size, image_size=SIZE, train=train, aug=aug,
                       rank=rank, world_size=world_size, seed=seed, num_workers=workers, backend="torch"))


def run(ld: TorchLoader):
    batches = list(ld)
    assert len(batches) == len(ld)
    return batches


def test_eval_every_id_once_with_labels_from_source_folders(packed):
    ld = loader(packed, "val", train=False)
    batches = run(ld)
    truth = folder_labels(packed.parent / "images")
    ids = [i for b in batches for i in b.ids]
    assert sorted(ids) == sorted(split_ids(packed, "val")) and len(set(ids)) == len(ids) == ld.num_samples
    for b in batches:
        assert b.images.dtype == torch.float32 and b.images.shape[1:] == (3, SIZE, SIZE)
        assert b.images.device.type == "cpu"
        assert b.images.min() >= LOW - 1e-4 and b.images.max() <= HIGH + 1e-4
        assert b.labels.dtype == torch.float32 and b.labels.shape == (len(b.ids),)
        assert b.labels.tolist() == [float(truth[i]) for i in b.ids]
    labels = torch.cat([b.labels for b in batches])
    assert 0 < labels.sum() < len(labels), "both classes expected in val"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io decode, used as the reference
def test_eval_image_is_resize_and_normalize_of_the_original_file(packed):
    from torchvision.io import ImageReadMode, decode_image

    by_key = {}
    for name in ("real", "fake"):
        for path in (packed.parent / "images" / name).iterdir():
            by_key[hashlib.sha256(path.read_bytes()).hexdigest()[:32]] = path
    batch = next(iter(loader(packed, "val", train=False)))
    for image, key in zip(batch.images, batch.ids):
        original = decode_image(str(by_key[key]), mode=ImageReadMode.RGB)
        # the same pixels (a level is 0.017 after normalising); the normalising rounds differently
        assert torch.allclose(image, normalize(resize_uint8(original, SIZE)[None])[0], rtol=0, atol=1e-5)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 4])
def test_eval_ranks_union_complete_no_overlap(packed, world_size):
    expected = sorted(split_ids(packed, "val"))
    ranks = [loader(packed, "val", train=False, rank=r, world_size=world_size, workers=2 if r == 0 else 0,
                    batch_size=4) for r in range(world_size)]
    assert len({len(ld) for ld in ranks}) == 1
    runs = [run(ld) for ld in ranks]
    sizes = [[len(b.ids) for b in batches] for batches in runs]
    assert all(s == sizes[0] for s in sizes), "ranks must yield batches of the same sizes at each step"
    kept = [drop_repeats([i for b in batches for i in b.ids])[0] for batches in runs]
    assert sum(len(k) for k in kept) == len(expected), "an id on two ranks"
    assert sorted(i for k in kept for i in k) == expected
    assert [len(k) for k in kept] == [ld.num_samples for ld in ranks]
    if len(expected) % world_size:
        assert sum(sizes[0]) * world_size > len(expected), "uneven split must be padded"


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 4 workers on purpose
def test_train_equal_steps_disjoint_ranks_correct_labels(packed):
    truth = folder_labels(packed.parent / "images")
    # rank 0 with 4 workers: 2 ranks x 4 workers is more than the 7 train shards
    ranks = [loader(packed, "train", train=True, rank=r, world_size=2, workers=w) for r, w in ((0, 4), (1, 0))]
    assert len(ranks[0]) == len(ranks[1]) > 0
    seen = []
    for ld in ranks:
        batches = run(ld)
        ids = [i for b in batches for i in b.ids]
        assert all(len(b.ids) == 8 for b in batches), "train drops the last partial batch"
        assert len(set(ids)) == len(ids) == ld.num_samples, "an id twice within an epoch"
        for b in batches:
            assert b.labels.tolist() == [float(truth[i]) for i in b.ids]
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] <= set(split_ids(packed, "train"))


@pytest.mark.timeout(180)
def test_train_order_per_epoch_and_seed(packed):
    def order(ld, epoch):
        ld.set_epoch(epoch)
        return [i for b in ld for i in b.ids]

    a, b = loader(packed, "train", train=True, workers=2), loader(packed, "train", train=True, workers=2)
    first = order(a, 0)
    assert order(b, 0) == first, "same seed and epoch must give the same order"
    assert order(a, 1) != first, "another epoch must give another order"
    assert order(a, 0) == first
    assert order(loader(packed, "train", train=True, workers=2, seed=1), 0) != first


def test_train_aug_changes_pixels_not_labels(packed):
    plain = list(loader(packed, "train", train=True, aug=AugConfig.preset("none")))
    augmented = list(loader(packed, "train", train=True, aug=AugConfig.preset("robust", apply_prob=1.0)))
    assert [b.ids for b in plain] == [b.ids for b in augmented], "augmentation must not change the order"
    changed = 0
    for p, a in zip(plain, augmented):
        assert torch.equal(p.labels, a.labels)
        changed += sum(not torch.allclose(x, y, atol=1e-3) for x, y in zip(p.images, a.images))
    assert changed == sum(len(b.ids) for b in plain)


def test_build_loader_torch_backend(packed):
    ld = build_loader(LoaderSpec(packed, "val", backend="torch", batch_size=5, image_size=SIZE, train=False, num_workers=0))
    assert isinstance(ld, TorchLoader)
    assert sorted(i for b in ld for i in b.ids) == sorted(split_ids(packed, "val"))


def test_local_pattern_without_manifest(packed):
    names = [e["name"] for e in json.loads((packed / "manifest.json").read_text())["splits"]["val"]["shards"]]
    assert len(names) == 2
    pattern = f"{packed}/val-{{{names[0][4:10]}..{names[-1][4:10]}}}.tar"
    ld = loader(pattern, "val", train=False, world_size=2, rank=1)
    ids = [i for b in ld for i in b.ids]
    assert ld.num_samples == len(split_ids(packed, "val")) // 2 and len(drop_repeats(ids)[0]) == ld.num_samples


def test_remote_pattern_is_refused_clearly(packed):
    with pytest.raises(DataError, match="pipe:. commands are not read"):
        loader(f"pipe:cat {packed}/val-{{000000..000001}}.tar", "val", train=True)


def test_png_and_webp_members_are_read(tmp_path):
    real, fake = make_image_dirs(tmp_path / "images", n_real=6, n_fake=6, size=40, seed=4)
    rng = np.random.default_rng(9)
    write_image(real / "extra.png", make_face(rng, 40))
    write_image(fake / "extra.webp", make_face(rng, 40, fake=True), lossless=True)
    out = pack_dirs(real, fake, tmp_path / "shards", "--val-fraction", "0.5", "--shard-size", "4")
    truth = folder_labels(tmp_path / "images")
    keys = {}
    for split in ("train", "val"):
        for b in loader(out, split, train=False):
            keys.update({i: l for i, l in zip(b.ids, b.labels.tolist())})
    assert keys == {k: float(v) for k, v in truth.items()}


def test_missing_shard_named(packed_copy):
    data = packed_copy
    (data / "train-000001.tar").unlink()
    with pytest.raises(DataError, match=r"train-000001\.tar.*missing.*--verify"):
        loader(data, "train", train=True)


@pytest.mark.timeout(120)
def test_shard_removed_after_start_named(packed_copy):
    data = packed_copy
    ld = loader(data, "val", train=False, workers=2)
    (data / "val-000001.tar").unlink()
    with pytest.raises(DataError, match=r"val-000001\.tar.*--verify") as err:
        list(ld)
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)


def test_truncated_shard_named(packed_copy):
    data = packed_copy
    shard = data / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match=r"train-000002\.tar.*bytes.*--verify"):
        loader(data, "train", train=True)
    # Without a manifest (a shard pattern) the truncation shows when the tar is read.
    with pytest.raises(DataError, match=r"train-000002\.tar.*--verify"):
        list(loader(f"{data}/train-{{000000..000003}}.tar", "train", train=True))


@pytest.mark.parametrize("cut", ["boundary", "inside"])
def test_shard_cut_after_start_named(packed_copy, cut):
    data = packed_copy
    ld = loader(data, "val", train=False)
    shard = data / "val-000001.tar"
    with tarfile.open(shard) as tar:
        members = list(tar)
    third = members[6]  # first member of the third sample: a cut there leaves two whole samples
    end = third.offset if cut == "boundary" else third.offset_data + 1
    shard.write_bytes(shard.read_bytes()[:end])
    # the shard's SHA-256 (checked once per version of the file) or, for an unhashed one, its read
    with pytest.raises(DataError, match=r"val-000001\.tar.*(ends after 2 samples|cannot read|its SHA-256 differs)"
                                        r".*--verify"):
        list(ld)


@pytest.mark.timeout(120)
def test_corrupt_image_named_through_workers(packed_copy):
    data = packed_copy
    shard = data / "val-000000.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    raw = bytearray(shard.read_bytes())
    raw[member.offset_data: member.offset_data + member.size] = bytes(member.size)  # same size: manifest still matches
    shard.write_bytes(bytes(raw))
    manifest = json.loads((data / "manifest.json").read_text())  # without the shard's own SHA-256, which
    manifest["splits"]["val"]["shards"][0].pop("sha256")          # would name the shard, not the sample
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"val-000000\.tar.*{member.name[:-4]}\.jpg.*--verify") as err:
        list(loader(data, "val", train=False, workers=2))
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)


def test_too_few_samples_for_a_batch(packed):
    with pytest.raises(ValueError, match="--batch-size 64: larger than each process"):
        loader(packed, "val", train=True, world_size=2, batch_size=64)



@pytest.mark.gpu
@pytest.mark.parametrize("aug", ["none", "seed"])
def test_cuda_path_matches_cpu_path(packed, aug):
    """CUDA (augment on the GPU, in float) and CPU (augment in the workers, in uint8): the same
    parameters per sample, so the same batches within a level or two."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    def make(device):
        return build_loader(LoaderSpec(packed, "train", device=device, batch_size=8, image_size=40, train=True,
                           aug=AugConfig.preset(aug), num_workers=2, backend="torch"))

    for cpu, gpu in zip(make("cpu"), make("cuda")):
        assert gpu.images.device.type == "cuda" and gpu.ids == cpu.ids
        assert torch.equal(gpu.labels.cpu(), cpu.labels)
        levels = (gpu.images.cpu() - cpu.images).abs() * 255 * 0.229
        assert levels.max() <= 2.0 and levels.mean() <= 0.3


def test_resolve_backend():
    from pipeline.data.contract import resolve_backend

    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("dali", "cpu") == "dali" and resolve_backend("torch", "cuda") == "torch"
    expected = "dali" if importlib.util.find_spec("nvidia.dali") is not None else "torch"
    assert resolve_backend("auto", "cuda") == expected  # no CUDA needed to decide
    with pytest.raises(ValueError, match="auto, dali, torch"):
        build_loader(LoaderSpec("unused", "val", backend="fast", train=False))


# ---------------------------------------------------------------- hand-off (pipeline.data.handoff)
@pytest.mark.timeout(180)
def test_cpu_batches_come_finished_in_recycled_slabs(packed):
    ld = loader(packed, "train", train=True, workers=2, batch_size=4)
    for epoch in range(2):
        ld.set_epoch(epoch)
        for b in ld:
            assert b.images.dtype == torch.float32 and b.images.shape == (4, 3, SIZE, SIZE)
            assert b.images.is_contiguous(memory_format=torch.channels_last)
            assert b.images.min() >= LOW - 1e-4 and b.images.max() <= HIGH + 1e-4
    from pipeline.data.handoff import LENT

    pool = ld._own[1]
    assert pool.fresh == 0, "a consumer that drops each batch must never need a fresh one"
    assert not (pool.writer.busy == LENT).any(), "every batch handed out was given back"
    ld.close()


@pytest.mark.timeout(180)
def test_batches_kept_by_the_consumer_are_never_overwritten(packed):
    ld = loader(packed, "train", train=True, workers=2, batch_size=4)
    copies = [(b.ids, b.images.clone(), b.labels.clone()) for b in ld]  # each batch dropped at once
    kept = list(ld)  # every batch held: the workers run out of free slabs and send fresh ones
    assert ld._own[1].fresh > 0
    assert len(kept) == len(copies)
    for (ids, images, labels), b in zip(copies, kept):
        assert b.ids == ids and torch.equal(b.images, images) and torch.equal(b.labels, labels)


@pytest.mark.timeout(180)
def test_persistent_workers_follow_set_epoch_and_nested_iterations(packed):
    """The workers persist across epochs (the epoch reaches them through shared memory): each epoch
    is what a fresh loader gives for it; an iteration opened while another runs gets its own workers."""
    ld = loader(packed, "train", train=True, workers=2, batch_size=4)
    ids = {}
    for epoch in (0, 1, 0):
        ld.set_epoch(epoch)
        ids.setdefault(epoch, []).append([b.ids for b in ld])
    assert ids[0][0] == ids[0][1] and ids[0][0] != ids[1][0]
    fresh = loader(packed, "train", train=True, workers=2, batch_size=4)
    fresh.set_epoch(1)
    assert [b.ids for b in fresh] == ids[1][0]
    ld.set_epoch(0)
    outer = iter(ld)
    first = next(outer)
    inner = [b.ids for b in ld]  # while `outer` is open
    assert inner == ids[0][0] and [first.ids] + [b.ids for b in outer] == ids[0][0]
    for x in (ld, fresh):
        x.close()


# ---------------------------------------------------------------- GPU decode (pipeline.data.encoded)
def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Difference of two normalised batches in 8-bit levels (the largest STD turns 1 level into 1/255/0.229)."""
    return (a.cpu() - b.cpu()).abs() * 255 * min(STD)


def _decode_paths(data, split, *, aug, device="cpu", decode_device="cpu", size=40, batch_size=8):
    """The same spec through the CPU path and the GPU-decode path (on ``decode_device``)."""
    from pipeline.data.shards import resolve_shards

    spec = LoaderSpec(data, split, device="cpu", batch_size=batch_size, image_size=size, train=True,
                      aug=AugConfig.preset(aug), num_workers=2, backend="torch")
    shards = resolve_shards(spec.data, spec.split)
    gpu_spec = spec.replace(device=device, decode="gpu") if device != "cpu" else spec
    return TorchLoader(spec, shards), TorchLoader(gpu_spec, shards, decode_device=decode_device)


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("aug", ["none", "seed"])
def test_gpu_decode_assembly_on_cpu_matches_cpu_path(packed, aug):
    """Workers ship JPEG bytes, the main process decodes (torchvision on the CPU here), resizes and
    augments the batch as on a GPU: the same batches as the workers' own decode, within a level
    (eval: the same decoder, the same resize) or two (train: float warp vs OpenCV's uint8 warp)."""
    cpu, encoded = _decode_paths(packed, "train", aug=aug)
    assert encoded.mode == "encoded" and cpu.mode == "finish"
    n = 0
    for a, b in zip(cpu, encoded):
        assert a.ids == b.ids and torch.equal(a.labels, b.labels)
        levels = _levels(a.images, b.images)
        assert levels.max() <= (1.0 if aug == "none" else 2.0) and levels.mean() <= 0.3, (aug, levels.max())
        n += 1
    assert n == len(cpu) > 0


def _mixed_format_pack(tmp_path: Path) -> Path:
    """A pack whose samples are JPEG, PNG and WebP of three different sizes."""
    real, fake = make_image_dirs(tmp_path / "images", n_real=6, n_fake=6, size=40, seed=4)
    rng = np.random.default_rng(9)
    for i, size in enumerate((40, 52, 64)):
        write_image(real / f"extra{i}.png", make_face(rng, size))
        write_image(fake / f"extra{i}.webp", make_face(rng, size, fake=True), lossless=True)
        write_image(real / f"big{i}.jpg", make_face(rng, size + 8))
    return pack_dirs(real, fake, tmp_path / "shards", "--val-fraction", "0.5", "--shard-size", "4")


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gpu_decode_batch_with_png_webp_and_mixed_sizes_on_cpu(tmp_path):
    data = _mixed_format_pack(tmp_path)
    for split in ("train", "val"):
        cpu, encoded = _decode_paths(data, split, aug="none", size=32, batch_size=4)
        for a, b in zip(cpu, encoded):
            assert a.ids == b.ids and torch.equal(a.labels, b.labels)
            assert _levels(a.images, b.images).max() <= 1.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_decode_batch_rows_of_every_kind(tmp_path):
    """`decode_batch` directly: JPEGs of two sizes and pixel rows, each in its own place."""
    import cv2

    from pipeline.augment import uint8_ops
    from pipeline.data.encoded import batch_rows, decode_batch, encode_batch

    rng = np.random.default_rng(3)
    images = [make_face(rng, s) for s in (24, 40, 24)]
    jpegs = [cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1].tobytes() for im in images]
    png = make_face(rng, 30)
    batch = encode_batch([jpegs[0], png, jpegs[1], jpegs[2]], 16)
    out = decode_batch(batch_rows(batch), ["a", "b", "c", "d"], 16, torch.device("cpu"), "hint")
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.uint8
    expect = np.empty((4, 16, 16, 3), np.uint8)
    uint8_ops.resize_into([uint8_ops.decode(jpegs[0]), png, uint8_ops.decode(jpegs[1]), uint8_ops.decode(jpegs[2])],
                          expect)
    assert (out.permute(0, 2, 3, 1).int() - torch.from_numpy(expect).int()).abs().max() <= 1


def test_decode_batch_names_an_undecodable_sample(tmp_path):
    from pipeline.data.encoded import JPEG_MAGIC, batch_rows, decode_batch, encode_batch

    batch = encode_batch([JPEG_MAGIC + bytes(100)], 16)
    with pytest.raises(DataError, match=r"sample k1\.jpg: cannot decode it.*--verify"):
        decode_batch(batch_rows(batch), ["k1"], 16, torch.device("cpu"), "run deepfake-inspect OUT --verify")


def test_gpu_decode_leaves_crops_to_the_workers_and_blends_on_the_batch(packed):
    """Crops need the decoded pixels in the worker: no encoded path then (and crops are self-blended there
    too); whole resized images are self-blended on the device batch."""
    from pipeline.data.shards import resolve_shards

    shards = resolve_shards(str(packed), "train")
    for aug, mode, on_batch in ((AugConfig.preset("artifact"), "finish", False),
                                (AugConfig.preset("artifact", self_blend=0.5), "finish", False),
                                (AugConfig.preset("seed", self_blend=0.5), "encoded", True)):
        spec = LoaderSpec(packed, "train", device="cpu", batch_size=4, image_size=SIZE, train=True, aug=aug,
                          num_workers=0, backend="torch")
        ld = TorchLoader(spec, shards, decode_device="cpu")
        assert (ld.mode, ld.blend_on_batch) == (mode, on_batch)
        assert (ld.decode_device is None) == (mode == "finish")
        assert len(next(iter(ld)).ids) == 4


def test_decode_flag_is_checked():
    assert LoaderSpec("x", "val", train=False).decode == "cpu"
    assert LoaderSpec("x", "val", train=False, device="cuda").decode == "gpu"  # no CUDA needed to decide
    with pytest.raises(ValueError, match=r"--decode gpu: needs a CUDA --device"):
        LoaderSpec("x", "val", train=False, decode="gpu")
    with pytest.raises(ValueError, match=r"--decode 'fast': choose one of auto, cpu, gpu"):
        LoaderSpec("x", "val", train=False, decode="fast")


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("aug", ["none", "seed"])
def test_gpu_decode_path_matches_cpu_path(packed, aug):
    """nvJPEG decode + GPU resize/augmentation vs the workers' CPU decode + uint8 augmentation."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu, gpu = _decode_paths(packed, "train", aug=aug, device="cuda", decode_device=None)
    assert gpu.mode == "encoded" and gpu.decode_device.type == "cuda"
    for a, b in zip(cpu, gpu):
        assert b.images.device.type == "cuda" and a.ids == b.ids and torch.equal(a.labels, b.labels.cpu())
        levels = _levels(a.images, b.images)  # nvJPEG and libjpeg-turbo differ by a few levels (NOTES.md)
        assert levels.max() <= 6.0 and levels.mean() <= 0.6, (aug, levels.max(), levels.mean())


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gpu_decode_batch_with_png_samples_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    data = _mixed_format_pack(tmp_path)
    for split in ("train", "val"):
        cpu, gpu = _decode_paths(data, split, aug="none", device="cuda", decode_device=None, size=32, batch_size=4)
        for a, b in zip(cpu, gpu):
            assert a.ids == b.ids and b.images.device.type == "cuda"
            assert _levels(a.images, b.images).max() <= 6.0
