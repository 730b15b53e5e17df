"""pipeline.data.shards and the torch backend's per-sample checks: nothing trusted that was not checked.

Each case edits a copy of a real packed output (`packed_copy`) the way a damaged disk, a hand edit or
a hostile user would, and asserts one clear error naming the file, never silent loss or a hang.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from pipeline.data.contract import LoaderSpec
from pipeline.data.loader import build_loader
from pipeline.data.shards import DataError, resolve_shards, verify_shards

pytestmark = pytest.mark.timeout(60)  # a FIFO opened by mistake would hang: fail instead


def _ids(data, split="val", **kw):
    spec = LoaderSpec(str(data), split, train=False, backend="torch", batch_size=4, image_size=32, num_workers=0, **kw)
    return [i for b in build_loader(spec) for i in b.ids]


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root: Path, m: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(splits=[1, 2]), "splits"),
    (lambda m: m["splits"]["val"]["shards"][0].pop("name"), "splits.val.shards[0].name"),
    (lambda m: m["splits"]["val"]["shards"][0].update(num_samples="9"), "splits.val.shards[0].num_samples"),
    (lambda m: m["splits"]["val"]["shards"][0].update(name="../../etc/passwd.tar"), "splits.val.shards[0].name"),
    (lambda m: m["splits"]["val"]["shards"][0].update(sha256="xyz"), "splits.val.shards[0].sha256"),
    (lambda m: m["splits"]["val"].update(shards={"a": 1}), "splits.val.shards"),
    (lambda m: m["splits"]["val"].update(num_samples=10 ** 6), "splits.val.num_samples"),
])
def test_malformed_manifest_names_the_field(packed_copy, edit, field):
    m = _manifest(packed_copy)
    edit(m)
    _write_manifest(packed_copy, m)
    with pytest.raises(DataError) as e:
        resolve_shards(packed_copy, "val")
    assert f"{field}:" in str(e.value) and "\n" not in str(e.value)


def test_manifest_that_is_not_json_or_not_an_object(packed_copy):
    (packed_copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object"):
        resolve_shards(packed_copy, "val")
    (packed_copy / "manifest.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(DataError, match="cannot read the manifest"):
        resolve_shards(packed_copy, "val")


def test_pattern_names_one_split(packed):
    pattern = str(packed / "train-{000000..000001}.tar")
    assert len(resolve_shards(pattern, "train").shards) == 2
    with pytest.raises(DataError, match="names the 'train' split.*not 'val'"):
        resolve_shards(pattern, "val")


def test_pattern_in_an_interrupted_pack_is_refused(packed_copy):
    (packed_copy / "manifest.json").unlink()
    (packed_copy / ".tmp-train-000009.tar.x1").write_bytes(b"half")
    with pytest.raises(DataError, match="interrupted deepfake-pack output"):
        resolve_shards(str(packed_copy / "train-{000000..000001}.tar"), "train")


def test_fifo_is_refused_not_opened(packed_copy):
    fifo = packed_copy / "train-000099.tar"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        resolve_shards(str(fifo), "train")
    m = _manifest(packed_copy)
    m["splits"]["val"]["shards"][0]["name"] = fifo.name
    m["splits"]["val"]["shards"][0].pop("bytes", None)
    _write_manifest(packed_copy, m)
    with pytest.raises(DataError, match="not a regular file"):
        resolve_shards(packed_copy, "val")
    os.unlink(fifo)
    os.mkfifo(packed_copy / "manifest.json.fifo")
    (packed_copy / "manifest.json").unlink()
    os.rename(packed_copy / "manifest.json.fifo", packed_copy / "manifest.json")
    with pytest.raises(DataError, match="not a regular file"):
        resolve_shards(packed_copy, "val")


def test_lowered_sample_count_is_caught(packed_copy):
    m = _manifest(packed_copy)
    entry = m["splits"]["val"]["shards"][0]
    entry["num_samples"] -= 1
    m["splits"]["val"]["num_samples"] -= 1
    _write_manifest(packed_copy, m)
    with pytest.raises(DataError, match=rf"{entry['name']} holds more than the {entry['num_samples']} samples"):
        _ids(packed_copy)


def _rewrite_member(shard: Path, suffix: str, change) -> str:
    """Rewrite the first member ending in ``suffix`` of ``shard`` with ``change(bytes)``; returns its name."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    target = next(m.name for m, _ in members if m.name.endswith(suffix))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in members:
            if m.name == target:
                data = change(data)
                m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    return target


def _refresh_bytes(root: Path, shard: Path, *, keep_sha: bool = False) -> None:
    """The manifest's size of ``shard`` updated; its SHA-256 dropped unless ``keep_sha`` (the shard-level hash
    would catch any change first: these tests are about the per-sample checks)."""
    m = _manifest(root)
    for e in m["splits"]["val"]["shards"]:
        if e["name"] == shard.name:
            e["bytes"] = shard.stat().st_size
            if not keep_sha:
                e.pop("sha256")
    _write_manifest(root, m)


def test_flipped_label_is_caught(packed_copy):
    shard = packed_copy / "val-000000.tar"
    name = _rewrite_member(shard, ".cls", lambda b: b"1" if b.strip() == b"0" else b"0")
    _refresh_bytes(packed_copy, shard)  # the size check alone would not see it
    with pytest.raises(DataError, match=rf"{name[:-4]}\.cls says .* but {name[:-4]}\.json says label"):
        _ids(packed_copy)


def test_flipped_image_bytes_are_caught(packed_copy, packed):
    shard = packed_copy / "val-000000.tar"
    name = _rewrite_member(shard, ".jpg", lambda b: b[:200] + bytes([b[200] ^ 0xFF]) + b[201:])
    _refresh_bytes(packed_copy, shard)
    with pytest.raises(DataError, match=rf"{name}: the image bytes do not match their SHA-256"):
        _ids(packed_copy)
    m = _manifest(packed_copy)  # the manifest's SHA-256 of the shard back: caught before any sample is read
    m["splits"]["val"]["shards"][0]["sha256"] = _manifest(packed)["splits"]["val"]["shards"][0]["sha256"]
    _write_manifest(packed_copy, m)
    with pytest.raises(DataError, match="val-000000.tar: its SHA-256 differs from the manifest"):
        _ids(packed_copy)
    with pytest.raises(DataError, match="val-000000.tar: its SHA-256 differs from the manifest"):
        verify_shards(resolve_shards(packed_copy, "val"), progress=False)


def test_intact_pack_reads_every_id_once_and_verifies(packed):
    ids = _ids(packed)
    assert len(ids) == len(set(ids)) == _manifest(packed)["splits"]["val"]["num_samples"]
    verify_shards(resolve_shards(packed, "val"), progress=False)
