"""The DALI and torchvision backends agree: same ids and labels, same pixels within a few levels."""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch

pytest.importorskip("nvidia.dali")

from pipeline.augment.config import STD, AugConfig
from pipeline.data.contract import LoaderSpec
from pipeline.data.loader import build_loader

pytestmark = pytest.mark.timeout(180)

SIZE = 48  # the packed fixture's image size


def samples(data, backend: str, *, split="val", train=False, aug="none", image_size=SIZE, rank=0,
            world_size=1) -> Dict[str, Tuple[torch.Tensor, float]]:
    """id -> (image, label) over one pass; padding repeats collapse onto their first occurrence."""
    loader = build_loader(LoaderSpec(
        data, split, backend=backend, device="cpu", batch_size=4, image_size=image_size, train=train,
        aug=aug, rank=rank, world_size=world_size, seed=0, num_workers=1,
    ))
    out: Dict[str, Tuple[torch.Tensor, float]] = {}
    for batch in loader:
        for key, image, label in zip(batch.ids, batch.images, batch.labels.tolist()):
            out.setdefault(key, (image, label))
    return out


def assert_close(a, b, keys, max_levels: float = 3.0, mean_levels: float = 0.5) -> None:
    """Pixels within a few 8-bit levels (the backends' resize/warp round differently)."""
    for key in keys:
        levels = (a[key][0] - b[key][0]).abs() * 255 * max(STD)
        assert levels.max().item() <= max_levels and levels.mean().item() <= mean_levels, key


@pytest.mark.parametrize("image_size", [SIZE, 32, 64])
def test_eval_same_ids_labels_images(packed, image_size):
    dali = samples(packed, "dali", image_size=image_size)
    torch_ = samples(packed, "torch", image_size=image_size)
    assert set(dali) == set(torch_) and len(dali) == 18
    assert all(dali[k][1] == torch_[k][1] for k in dali)
    assert_close(dali, torch_, dali)


def test_eval_two_ranks_same_union(packed):
    unions = []
    for backend in ("dali", "torch"):
        parts = [set(samples(packed, backend, rank=r, world_size=2)) for r in range(2)]
        assert not parts[0] & parts[1]
        unions.append(parts[0] | parts[1])
    assert unions[0] == unions[1] and len(unions[0]) == 18


def test_train_same_labels_and_images_without_aug(packed):
    dali = samples(packed, "dali", split="train", train=True)
    torch_ = samples(packed, "torch", split="train", train=True)
    common = set(dali) & set(torch_)
    assert len(common) >= 40  # each drops its last partial batch, in its own shuffled order
    assert all(dali[k][1] == torch_[k][1] for k in common)
    assert_close(dali, torch_, common)


def test_same_augmentation_conventions(packed):
    """Fixed (non-random) parameters: flips, shears, zoom and brightness mean the same in both."""
    aug = AugConfig(
        apply_prob=1.0, vflip=1.0, shear_x=(10.0, 10.0), shear_y=(-7.0, -7.0), scale=(0.8, 0.8),
        brightness=(0.8, 0.8),
    )
    dali = samples(packed, "dali", split="train", train=True, aug=aug)
    torch_ = samples(packed, "torch", split="train", train=True, aug=aug)
    plain = samples(packed, "dali", split="train", train=True)
    common = set(dali) & set(torch_) & set(plain)
    assert len(common) >= 30
    assert_close(dali, torch_, common)
    assert all((dali[k][0] - plain[k][0]).abs().mean().item() > 0.05 for k in common)
