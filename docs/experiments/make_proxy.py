"""Shifted copies of val images (never trained on): resized to 128 / 384 px and re-encoded as JPEG q80,
the way face crops of other sizes and shared photos reach a detector. 400 per class, seed 0."""
import io, random, sys, tarfile, json
from pathlib import Path
from PIL import Image
root = Path("shards/faces")
out = Path("runs/proxy")
samples = {0: [], 1: []}
for tar in sorted(root.glob("val-*.tar")):
    with tarfile.open(tar) as t:
        members = {}
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = t.extractfile(m).read()
        for key, d in members.items():
            img = next((d[e] for e in ("jpg", "png", "webp") if e in d), None)
            samples[int(d["cls"].strip())].append((key, img))
rng = random.Random(0)
for label in samples:
    rng.shuffle(samples[label])
for size in (128, 384):
    for label, name in ((0, "real"), (1, "fake")):
        d = out / f"s{size}" / name
        d.mkdir(parents=True, exist_ok=True)
        for key, data in samples[label][:400]:
            im = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
            im.save(d / f"{key}.jpg", quality=80)
print({k: len(v) for k, v in samples.items()})
