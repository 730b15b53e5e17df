"""Baseline rows: the original project's loader and a naive webdataset loader, on the same images."""
from __future__ import annotations

from typing import List, Tuple

import torch

from pipeline.augment.config import MEAN, STD
from pipeline.benchmark.harness import Stream, TreeMonitor
from pipeline.benchmark.rows.common import epochs, finish, list_images, shard_paths


# ---------------------------------------------------------------- 3. original-project baseline
class OriginalDataset(torch.utils.data.Dataset):
    """The original project's per-item path (see docs ORIGINAL.md), with correct labels.

    cv2.imread -> BGR->RGB -> cv2.resize -> swapaxes(0, 2) -> float tensor 0..255 -> for odd items the
    v2.Compose of flips, RandomAffine, ColorJitter and Resize. PIL stands in when cv2 is missing.
    """

    def __init__(self, items: List[Tuple[str, int]], size: int) -> None:
        from torchvision.transforms import v2

        self.items, self.size = items, size
        self.aug = v2.Compose([
            v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5),
            v2.RandomAffine(degrees=(-30, 30), shear=(0.75, 1.25, 0.75, 1.25)),
            v2.ColorJitter(brightness=(0.75, 1.25)), v2.Resize((size, size)),
        ])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import cv2
        import numpy as np

        path, label = self.items[i]
        img = cv2.imread(path)
        if img is None:
            raise ValueError(f"{path}: cv2.imread could not read the file")
        img = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (self.size, self.size))
        x = torch.Tensor(np.swapaxes(img, 0, 2))
        if i % 2:
            x = self.aug(x)
        return x, torch.tensor(float(label))


def row_original(params: dict, monitor: TreeMonitor) -> List[dict]:
    items = list_images(params)
    how = "cv2 (opencv-python-headless)"
    workers = params["workers"]
    loader = torch.utils.data.DataLoader(
        OriginalDataset(items, params["image_size"]), batch_size=params["batch_size"], shuffle=True,
        num_workers=workers, persistent_workers=workers > 0, drop_last=True,
        generator=torch.Generator().manual_seed(params["seed"]),
    )
    return finish(params, monitor, Stream(epochs(loader), processes=max(1, workers)),
                  note=f"{how} per file, float v2 transforms on half the items, DataLoader {workers} workers",
                  memory="grows with the number of files: the path list in every worker")


# ---------------------------------------------------------------- 4. naive webdataset
def row_wds(params: dict, monitor: TreeMonitor) -> List[dict]:
    import webdataset as wds
    from torchvision.transforms import v2

    shards = shard_paths(params)
    size = params["image_size"]
    tf = v2.Compose([
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
        v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5),
        v2.RandomAffine(degrees=(-30, 30), shear=(0.75, 1.25, 0.75, 1.25)),
        v2.ColorJitter(brightness=(0.75, 1.25)), v2.Resize((size, size)), v2.Normalize(MEAN, STD),
    ])
    # resampled: every worker draws shards with replacement, so no worker sits idle on few shards
    ds = (wds.WebDataset(shards, resampled=True, shardshuffle=False, nodesplitter=None, seed=params["seed"])
          .shuffle(256).decode("pil").to_tuple("jpg;png;webp", "cls").map_tuple(tf, int))
    workers = params["workers"]
    loader = torch.utils.data.DataLoader(ds, batch_size=params["batch_size"], num_workers=workers,
                                         persistent_workers=workers > 0)
    return finish(params, monitor, Stream(epochs(loader), processes=max(1, workers)),
                  note=f"webdataset + PIL decode + per-sample float v2 transforms, DataLoader {workers} workers",
                  memory="constant: shuffle buffer of 256 decoded samples per worker")
