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
