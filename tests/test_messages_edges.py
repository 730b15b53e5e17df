"""Messages that misled (issue 23, "Should fix"): each names the input and the flag the command really has,
on real files. Also the bounds that keep one huge image from taking minutes."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_image_dirs, one_error, usage_error, write_image

from pipeline import evaluate

pytestmark = pytest.mark.timeout(300)


# -- evaluate --set ---------------------------------------------------------------------------------
def test_set_same_folder_names_the_set(trained, image_dirs, tmp_path, capsys):
    real, _ = image_dirs
    msg = usage_error(capsys, evaluate.main, ["--checkpoint", str(trained), "--set", f"a={real},{real}",
                                               "--out", str(tmp_path / "e")])
    assert f"--set a: its real folder {real} and its fake folder {real} are the same path" in msg
    assert "--real" not in msg and "--fake" not in msg


def test_set_names_given_twice_are_refused(trained, image_dirs, tmp_path, capsys):
    real, fake = image_dirs
    msg = usage_error(capsys, evaluate.main, ["--checkpoint", str(trained), "--set", f"a={real},{fake}",
                                               "--set", f"a={real},{fake}", "--out", str(tmp_path / "e")])
    assert "--set a: that name is given 2 times" in msg


def test_set_of_empty_folders_is_one_line(trained, image_dirs, tmp_path, caplog):
    real, fake = image_dirs
    empty_r, empty_f = tmp_path / "er", tmp_path / "ef"
    empty_r.mkdir(), empty_f.mkdir()
    assert evaluate.main(["--checkpoint", str(trained), "--set", f"ok={real},{fake}", "--set", f"e={empty_r},{empty_f}",
                          "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "e")]) == 2
    msg = one_error(caplog)
    assert "--set e: no readable real and fake images to score" in msg and "labels and scores" not in msg
    assert not (tmp_path / "e").exists()


# -- evaluate / sbi-sheet on a damaged or remote pack ---------------------------------------------------
def test_corrupt_sample_json_names_the_shard(packed_copy, trained, tmp_path, caplog):
    tar = packed_copy / "val-000000.tar"
    members, broken = [], False
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            data = t.extractfile(m).read()
            if m.name.endswith(".json") and not broken:  # the first sample's json member
                data, broken = b"{oops", True
            members.append((m, data))
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as t:
        for m, data in members:
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    manifest = json.loads((packed_copy / "manifest.json").read_text())
    entry = manifest["splits"]["val"]["shards"][0]
    entry["bytes"] = tar.stat().st_size
    entry.pop("sha256")
    (packed_copy / "manifest.json").write_text(json.dumps(manifest))
    assert evaluate.main(["--checkpoint", str(trained), "--data", str(packed_copy), "--device", "cpu", "--workers", "0",
                          "--backend", "torch", "--out", str(tmp_path / "e")]) == 2
    msg = one_error(caplog)
    assert str(tar) in msg and ".json" in msg and "sample" in msg


def test_sbi_sheet_on_a_url_names_itself(tmp_path, capsys):
    from pipeline.sbi_sheet import main as sheet_main

    with pytest.raises(SystemExit) as e:
        sheet_main(["--data", "s3://bucket/faces", "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "deepfake-sbi-sheet reads the images of a local pack output" in err
    assert "evaluate" not in err


# -- pack: CSV rows skipped are named with their line ------------------------------------------------------
def test_csv_unterminated_quote_names_the_line(image_dirs, tmp_path, caplog):
    from shard_tools.pack import main as pack_main

    real, fake = image_dirs
    rows = tmp_path / "data.csv"
    rows.write_text(f'image,label\n"{real}/r0000.jpg,real\n{fake}/f0000.jpg,fake\n{real}/r0001.jpg,real\n')
    caplog.set_level(logging.INFO)
    assert pack_main(["--csv", str(rows), "--allow-outside-root", "--out", str(tmp_path / "o"), "--workers", "1",
                      "--min-shards", "1"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{rows}:2: bad-csv-row" in w and "unexpected end of data" in w for w in warnings), warnings


# -- bounds -----------------------------------------------------------------------------------------------
def test_full_scoring_reads_at_most_the_bounded_centre(tmp_path, caplog):
    from model import create_model
    from pipeline.data.folders import Item
    from pipeline.scoring.modes import FULL_MAX_SIDE, score_items, views

    image = np.random.default_rng(0).integers(0, 255, (FULL_MAX_SIDE + 900, FULL_MAX_SIDE + 300, 3), dtype=np.uint8)
    (v,) = views(image, "full", 64)
    assert tuple(v.shape) == (3, FULL_MAX_SIDE, FULL_MAX_SIDE)
    assert torch.equal(v, torch.from_numpy(image[450:450 + FULL_MAX_SIDE, 150:150 + FULL_MAX_SIDE]).permute(2, 0, 1))
    assert len(views(image, "tiles", 512)) == (FULL_MAX_SIDE // 512) ** 2
    big = write_image(tmp_path / "big.png", image[:FULL_MAX_SIDE + 10, :300])
    small = write_image(tmp_path / "small.png", image[:100, :100])
    caplog.set_level(logging.WARNING)
    scores, errors = score_items(create_model("deepfakenet_tiny").eval(), [Item(str(big), 0), Item(str(small), 1)],
                                 image_size=64, mode="full", progress=False)
    assert not errors and np.isfinite(scores).all()
    assert "1 image(s) larger than 2048 px on a side were scored on their centre 2048 px" in caplog.text


# -- bench: what it cannot do is refused before any row ---------------------------------------------------
@pytest.mark.parametrize("argv, expect", [
    (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
    (["--remote-data", "s3://no-such-bucket-here/x", "--storage-options",
      '{"endpoint_url": "http://127.0.0.1:9", "anon": true, "attempts": 1, "connect_timeout": 1}'], "cannot reach the server"),
    (["--remote-data", "s3://b/x", "--storage-options", "{nope"], "--storage-options must be a JSON object"),
    (["--storage-options", '{"anon": true}'], "--storage-options is for --remote-data"),
])
def test_bench_checks_device_and_remote_up_front(packed, tmp_path, caplog, argv, expect):
    from pipeline.bench import main as bench_main

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "b.json"
    assert bench_main(["--data", str(packed), "--rows", "read", "--json", str(out), *argv]) == 2
    assert expect in one_error(caplog) and not out.exists()
