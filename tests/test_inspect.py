"""shard_tools/inspect.py: summary, --verify on sound and damaged outputs, --grid contact sheet."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image

from shard_tools.inspect import main as inspect_main

REPO = Path(__file__).resolve().parents[1]


def test_verify_passes_on_a_sound_output(packed: Path, caplog):
    caplog.set_level(logging.INFO)
    assert inspect_main([str(packed), "--verify"]) == 0
    assert "verify: OK (80 samples)" in caplog.text and "train" in caplog.text


def test_verify_catches_a_flipped_byte(packed_copy: Path, caplog):
    shard = packed_copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        jpg = next(m for m in tar if m.name.endswith(".jpg"))
    data[jpg.offset_data + jpg.size // 2] ^= 0xFF  # inside the first image's bytes
    shard.write_bytes(bytes(data))
    assert inspect_main([str(packed_copy), "--verify"]) == 1
    assert "train-000001.tar: sha256 differs" in caplog.text
    assert "do not hash to json sha256" in caplog.text and "FAILED" in caplog.text


def test_verify_catches_truncated_shard_missing_index_and_wrong_label(packed_copy: Path, caplog):
    (packed_copy / "val-000000.tar").write_bytes((packed_copy / "val-000000.tar").read_bytes()[:3000])
    (packed_copy / "val-000001.idx").unlink()
    # rewrite one shard with a cls that contradicts its json label
    src = packed_copy / "train-000000.tar"
    members = []
    with tarfile.open(src) as tar:
        for m in tar:
            members.append((m, tar.extractfile(m).read()))
    first_cls = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".cls"))
    m, old = members[first_cls]
    members[first_cls] = (m, b"1" if old == b"0" else b"0")
    with tarfile.open(src, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    assert inspect_main([str(packed_copy), "--verify"]) == 1
    text = caplog.text
    assert "val-000001.idx: DALI index is missing" in text
    assert "val-000000.tar" in text and ("cannot read the tar" in text or "samples, manifest says" in text)
    assert "but json label" in text and "train-000000.tar: classes" in text


def test_grid_writes_a_png(packed: Path, tmp_path: Path):
    out = tmp_path / "sheet.png"
    assert inspect_main([str(packed), "--grid", str(out), "--n", "9", "--thumb", "32", "--seed", "1"]) == 0
    im = Image.open(out)
    assert im.format == "PNG" and im.size == (3 * 32, 3 * (32 + 14))
    assert not list(tmp_path.glob(".tmp-*"))


def test_missing_manifest_exit_2(tmp_path: Path, caplog):
    assert inspect_main([str(tmp_path)]) == 2
    assert "manifest.json is missing" in caplog.text
    (tmp_path / "manifest.json").write_text("{not json")
    assert inspect_main([str(tmp_path)]) == 2
    assert "not a deepfake-pack manifest" in caplog.text


def test_summary_and_help_as_file(packed: Path):
    r = subprocess.run([sys.executable, str(REPO / "shard_tools" / "inspect.py"), "--help"], capture_output=True,
                       text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    for flag in ("--verify", "--grid", "--n", "--seed", "--thumb"):
        assert flag in r.stdout
    r = subprocess.run([sys.executable, str(REPO / "shard_tools" / "inspect.py"), str(packed)], capture_output=True,
                       text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((packed / "manifest.json").read_text())
    assert f"{'train':<6} {manifest['splits']['train']['num_samples']:>8} samples" in r.stderr


def test_verify_catches_an_index_of_another_shard_with_the_same_count(packed_copy: Path, caplog):
    a, b = packed_copy / "train-000000.idx", packed_copy / "train-000001.idx"
    head = a.read_text().split("\n", 1)[0]
    assert head == b.read_text().split("\n", 1)[0]  # same "v1.2 N" header
    n = int(head.split()[1])
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    assert inspect_main([str(packed_copy), "--verify"]) == 1
    assert f"{a}: {n} of {n} sample lines do not match the members of train-000000.tar" in caplog.text
    assert f"{b}: {n} of {n} sample lines do not match" in caplog.text
    assert "sha256 differs" not in caplog.text  # the tars themselves are fine


def test_verify_catches_one_shifted_offset(packed_copy: Path, caplog):
    idx = packed_copy / "val-000001.idx"
    lines = idx.read_text().split("\n")
    n = int(lines[0].split()[1])
    parts = lines[2].split()
    parts[5] = str(int(parts[5]) + 512)  # the second sample's image member, one block off
    lines[2] = " ".join(parts)
    idx.write_text("\n".join(lines))
    assert inspect_main([str(packed_copy), "--verify"]) == 1
    assert f"{idx}: 1 of {n} sample lines do not match the members of val-000001.tar (line 3: index has 'jpg" in caplog.text


def damage_one_image(shard: Path) -> str:
    """Overwrite the first image member's bytes with noise (same size: the tar stays readable); returns its key."""
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        jpg = next(m for m in tar if m.name.endswith(".jpg"))
    data[jpg.offset_data:jpg.offset_data + jpg.size] = bytes(range(256)) * (jpg.size // 256) + bytes(jpg.size % 256)
    shard.write_bytes(bytes(data))
    return jpg.name.split(".")[0]


def test_grid_skips_and_counts_bad_samples_of_a_corrupt_shard(packed_copy: Path, tmp_path: Path, caplog):
    key = damage_one_image(packed_copy / "train-000002.tar")
    (packed_copy / "val-000000.tar").write_bytes((packed_copy / "val-000000.tar").read_bytes()[:5000])
    sheet = tmp_path / "sheet.png"
    assert inspect_main([str(packed_copy), "--grid", str(sheet), "--n", "80", "--thumb", "16"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "could not be drawn" in errors[0]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("grid: skipped")]
    assert any(f"train-000002.tar: sample {key}:" in s for s in skipped)
    assert any("val-000000.tar" in s for s in skipped)
    drawn = Image.open(sheet)
    assert drawn.format == "PNG" and drawn.size[0] > 0 and not list(tmp_path.glob(".tmp-*"))
