"""Self-blending as a loader option (``AugConfig.self_blend``, ``--self-blend``, ``--fakes sbi-only``):
labels, ids, determinism and what each backend does, on real packed shards."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import help_text
from PIL import Image

from pipeline.augment.config import AugConfig
from pipeline.data.contract import LoaderSpec
from pipeline.data.loader import build_loader
from pipeline.data.torch_backend import SBI_SUFFIX
from pipeline.sbi_sheet import main as sheet_main


def _labels(packed: Path) -> dict:
    from pipeline.data.folders import shard_items
    from pipeline.data.shards import resolve_shards

    return {it.path: it.label for it in shard_items(resolve_shards(packed, "train").shards)}


def _epoch(packed: Path, epoch: int = 0, *, p: float = 0.5, fakes: str = "all", workers: int = 0, seed: int = 0):
    spec = LoaderSpec(str(packed), "train", train=True, backend="torch", batch_size=8, image_size=32, seed=seed,
                      aug=AugConfig.preset("none", self_blend=p), num_workers=workers, fakes=fakes)
    loader = build_loader(spec)
    loader.set_epoch(epoch)
    return [(i, float(label)) for b in loader for i, label in zip(b.ids, b.labels.tolist())]


def test_reals_become_fake_only_through_self_blending(packed):
    truth = _labels(packed)
    rows = _epoch(packed, p=0.5)
    for key, label in rows:
        if key.endswith(SBI_SUFFIX):
            assert label == 1.0 and truth[key[: -len(SBI_SUFFIX)]] == 0  # made from a real sample, never a fake
        else:
            assert label == truth[key]  # every other sample keeps its packed label
    n_sbi = sum(k.endswith(SBI_SUFFIX) for k, _ in rows)
    n_real = sum(1 for k, _ in rows if not k.endswith(SBI_SUFFIX) and truth[k] == 0)
    assert n_sbi > 0 and n_real > 0


def test_same_seed_and_epoch_same_pseudo_fakes_whatever_the_workers(packed):
    def blended(rows):  # source key -> was it turned into a pseudo-fake
        return {k.split("#")[0]: k.endswith(SBI_SUFFIX) for k, _ in rows}

    a, b, c = (blended(_epoch(packed, e, workers=w)) for e, w in ((1, 0), (1, 2), (2, 0)))
    both = set(a) & set(b)  # (the dropped partial batches depend on the workers)
    assert len(both) > 20 and any(a[k] for k in both)
    assert all(a[k] == b[k] for k in both)
    assert any(a[k] != c[k] for k in set(a) & set(c))  # another epoch draws again


def test_sbi_only_never_yields_a_true_fake(packed):
    truth = _labels(packed)
    rows = _epoch(packed, p=0.5, fakes="sbi-only")
    assert rows and all(truth[k.split("#")[0]] == 0 for k, _ in rows)
    assert all(label == (1.0 if k.endswith(SBI_SUFFIX) else 0.0) for k, label in rows)


def test_eval_is_never_blended(packed):
    spec = LoaderSpec(str(packed), "val", train=False, backend="torch", batch_size=8, image_size=32, num_workers=0,
                      aug=AugConfig.preset("none", self_blend=1.0))
    assert not [i for b in build_loader(spec) for i in b.ids if i.endswith(SBI_SUFFIX)]


def test_dali_refuses_with_the_option_named(packed):
    spec = LoaderSpec(str(packed), "train", train=True, backend="dali", batch_size=8, image_size=32,
                      aug=AugConfig.preset("seed", self_blend=0.5))
    with pytest.raises(ValueError, match="--self-blend: not implemented in the DALI backend; use --backend torch"):
        build_loader(spec)
    auto = LoaderSpec(str(packed), "train", train=True, backend="auto", device="cpu", aug=AugConfig.preset("artifact"))
    assert auto.backend == "torch"


def test_sbi_only_needs_self_blend(packed, tmp_path):
    from pipeline.train import main as train_main

    assert train_main(["--data", str(packed), "--out", str(tmp_path / "r"), "--cpu", "--fakes", "sbi-only"]) == 2


def test_contact_sheet_command(packed, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    assert sheet_main(["--data", str(packed), "--n", "3", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size[0] == 4 * im.size[1] // 3  # 3 rows of 4 square tiles
    assert "pseudo-fake" in help_text(sheet_main, capsys)
    assert sheet_main(["--images", str(tmp_path / "none"), "--out", str(out)]) == 2


# ---------------------------------------------------------------- the device-batch path (CUDA modes)
def _two_paths(packed: Path, p: float = 0.5):
    """The same spec through the workers' per-image blending (CPU ``finish`` mode) and the device-batch
    blending of the GPU-decode mode, run here with torchvision's CPU decoder (``decode_device='cpu'``)."""
    from pipeline.data.shards import resolve_shards
    from pipeline.data.torch_backend import TorchLoader

    spec = LoaderSpec(str(packed), "train", train=True, backend="torch", batch_size=8, image_size=48, seed=3,
                      aug=AugConfig.preset("none", self_blend=p), num_workers=2)
    shards = resolve_shards(spec.data, spec.split)
    return TorchLoader(spec, shards), TorchLoader(spec, shards, decode_device="cpu")


def _choice(key: str, seed: int = 3, epoch: int = 0, p: float = 0.5) -> int:
    import numpy as np

    from pipeline.augment.self_blend import draw_choice
    from pipeline.data.contract import derive_seed

    return draw_choice(np.random.default_rng(derive_seed(seed, epoch, key, "sbi")), p)[0]


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_batch_blending_makes_the_same_pseudo_fakes_as_the_workers(packed):
    """The GPU-mode path (workers draw the choices, the main process blends the batch) gives the same ids
    and labels as the workers' own blending; samples left alone are the same pixels, pseudo-fakes differ
    from them, and the two paths' pseudo-fakes are close (one blends at native size, one at output size)."""
    import torch

    from pipeline.augment.self_blend import BLEND, KEEP

    workers, batch = _two_paths(packed)
    assert workers.mode == "finish" and not workers.blend_on_batch
    assert batch.mode == "encoded" and batch.blend_on_batch
    seen = {KEEP: 0, BLEND: 0}
    for a, b in zip(workers, batch):
        assert a.ids == b.ids and torch.equal(a.labels, b.labels)
        for i, key in enumerate(a.ids):
            levels = (a.images[i] - b.images[i]).abs() * 255 * 0.225
            if key.endswith(SBI_SUFFIX):
                assert _choice(key[: -len(SBI_SUFFIX)]) == BLEND and float(a.labels[i]) == 1.0
                assert levels.mean() < 12, (key, float(levels.mean()))
                seen[BLEND] += 1
            elif float(a.labels[i]) == 1.0 or _choice(key) == KEEP:  # a true fake, or a real left alone
                assert levels.max() <= 1.0, (key, float(levels.max()))
                seen[KEEP] += 1
    assert seen[KEEP] > 3 and seen[BLEND] > 3, seen


def test_blend_batch_changes_only_the_chosen_rows_and_only_inside_the_mask():
    import numpy as np
    import torch
    from helpers import make_face

    from pipeline.augment.self_blend import BLEND, KEEP, TRANSFORM
    from pipeline.augment.self_blend_batch import blend_batch, choice_table, masks_for, params_from_table

    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.stack([make_face(rng, 64) for _ in range(6)])).permute(0, 3, 1, 2).contiguous()
    table = choice_table([np.random.default_rng(i) for i in range(6)], 1.0)  # p = 1: every row blends
    table[:, 1] = 0.0  # uniform 0 < source_prob: the source is the transformed copy, the target the image
    table[1, 0], table[4, 0] = KEEP, TRANSFORM
    out = blend_batch(x, torch.from_numpy(table))
    assert out.dtype == torch.uint8 and out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(out[1], x[1]) and torch.equal(out[4], x[4])  # kept; transform of the source only
    rows = [0, 2, 3, 5]
    p = params_from_table(table[rows])
    masks = masks_for(p, 64, 64, 4, x.device)
    for j, i in enumerate(rows):
        assert table[i, 0] == BLEND
        outside = masks[j] == 0
        inside = masks[j] > 0.5 * masks[j].max()  # the peak is the blend ratio (0.25 ... 1)
        assert outside.float().mean() > 0.2 and inside.any()
        assert torch.equal(out[i][:, outside], x[i][:, outside])  # the image itself outside the mask
        assert (out[i][:, inside].int() - x[i][:, inside].int()).abs().float().mean() > 0.5
    with pytest.raises(ValueError, match=r"choice table expected"):
        blend_batch(x, torch.zeros(6, 3))


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cuda_blends_on_the_gpu_batch_with_the_workers_choices(packed):
    import torch

    from pipeline.data.shards import resolve_shards
    from pipeline.data.torch_backend import TorchLoader

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    spec = LoaderSpec(str(packed), "train", train=True, backend="torch", batch_size=8, image_size=48, seed=3,
                      aug=AugConfig.preset("seed", self_blend=0.5), num_workers=2)
    shards = resolve_shards(spec.data, spec.split)
    cpu, gpu = TorchLoader(spec, shards), TorchLoader(spec.replace(device="cuda"), shards)
    assert gpu.mode == "encoded" and gpu.blend_on_batch
    n = 0
    for a, b in zip(cpu, gpu):
        assert a.ids == b.ids and torch.equal(a.labels, b.labels.cpu()) and b.images.device.type == "cuda"
        n += sum(k.endswith(SBI_SUFFIX) for k in b.ids)
    assert n > 0


@pytest.fixture(scope="module")
def face_packed(tmp_path_factory) -> Path:
    """A face-stage pack (``--faces``) of photos with one real face each: every sample's json has its box."""
    from helpers import write_image
    from media_helpers import face_jpegs, face_rgb, scene

    from shard_tools.pack import main as pack_main

    root = tmp_path_factory.mktemp("face_pack")
    for kind in ("real", "fake"):
        (root / kind).mkdir()
        for i, f in enumerate(face_jpegs(kind, 8, 40)):
            write_image(root / kind / f"{kind}{i}.jpg", scene([face_rgb(f, 120)], 320, 240, seed=i,
                                                              at=[(20 + 20 * i, 40 + 8 * i)]))
    out = root / "out"
    assert pack_main(["--real", str(root / "real"), "--fake", str(root / "fake"), "--out", str(out), "--faces",
                      "--face-size", "96", "--val-fraction", "0.25", "--min-shards", "1", "--workers", "1"]) == 0
    return out


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_batch_path_reads_the_face_box_of_each_real_sample(face_packed):
    """CUDA modes (here the GPU-decode mode with torchvision's CPU decoder): the workers put each real sample's
    face-stage box in its choice row (``--sbi-mask face``) and none under ``--sbi-mask ellipse``; the
    pseudo-fakes stay close to the workers' own (which blend on the same box at native size)."""
    import numpy as np
    import torch
    import webdataset as wds

    from pipeline.augment.face_mask import sample_face_box
    from pipeline.augment.self_blend_batch import BOX
    from pipeline.data.shards import resolve_shards
    from pipeline.data.torch_backend import TorchLoader

    def spec(mask):
        return LoaderSpec(str(face_packed), "train", train=True, backend="torch", batch_size=4, image_size=64,
                          seed=1, aug=AugConfig.preset("none", self_blend=1.0, sbi_mask=mask), num_workers=0)

    shards = resolve_shards(str(face_packed), "train")
    boxes = {s["__key__"]: sample_face_box(s) for s in wds.WebDataset(shards.shards, shardshuffle=False)}
    assert boxes and all(b is not None for b in boxes.values())
    for mask in ("face", "ellipse"):
        stream = TorchLoader(spec(mask), shards, decode_device="cpu")._make(False)[0]
        n_real = 0
        for _, labels, ids, _, table in stream:
            for key, label, row in zip(ids, labels, table):
                if label == 1 and not key.endswith(SBI_SUFFIX):  # a true fake: a KEEP row, no box
                    assert row[0] == 0 and np.isnan(row[BOX]).all()
                    continue
                n_real += 1
                own = boxes[key.removesuffix(SBI_SUFFIX)]
                np.testing.assert_allclose(row[BOX], np.asarray(own if mask == "face" else [np.nan] * 4))
        assert n_real > 3
    workers, batch = (TorchLoader(spec("face"), shards), TorchLoader(spec("face"), shards, decode_device="cpu"))
    n = 0
    for a, b in zip(workers, batch):
        assert a.ids == b.ids and torch.equal(a.labels, b.labels)
        for i, key in enumerate(a.ids):
            if key.endswith(SBI_SUFFIX):
                assert ((a.images[i] - b.images[i]).abs() * 255 * 0.225).mean() < 12
                n += 1
    assert n > 3
