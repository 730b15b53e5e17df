"""deepfake-bench on real tiny shards and folders: every row measured or skipped with a reason."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.bench import get_args_parser, main

REPO = Path(__file__).resolve().parents[1]
ALL_ROWS = [
    "read", "decode", "original", "wds", "limit_train", "limit_eval", "dali_train", "dali_eval", "torch_train",
    "torch_eval", "sbi_off", "sbi_on", "dali_epochs", "torch_epochs", "stall_synthetic", "stall_fed", "pack_25", "pack_100", "decode_files",
]
TINY = ["--batch-size", "4", "--image-size", "32", "--warmup", "1", "--batches", "2", "--repeats", "1",
        "--workers", "1", "--stall-warmup", "1", "--stall-steps", "1", "--decode-samples", "16",
        "--row-timeout", "240"]


def _folders(packed: Path):
    real, fake = packed.parent / "images" / "real", packed.parent / "images" / "fake"
    assert real.is_dir() and fake.is_dir(), "the packed fixture's image folders moved"
    return real, fake


def test_every_row_on_tiny_shards(packed, tmp_path):
    real, fake = _folders(packed)
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["--data", str(packed), "--images-real", str(real), "--images-fake", str(fake), "--device", "cpu",
               *TINY, "--tmp-dir", str(tmp_path), "--json", str(out_json), "--plot", str(out_png)])
    report = json.loads(out_json.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    failed = {n: r.get("reason") for n, r in rows.items() if r["status"] == "failed"}
    assert rc == 0 and not failed, failed
    assert list(rows) == ALL_ROWS
    for name, row in rows.items():
        if row["status"] == "skipped":  # only a missing library may skip a row on CPU
            assert name.startswith(("dali", "torch", "stall")) and row["reason"], row
            continue
        assert row["status"] == "ok", row
        assert row["img_s"] > 0 and all(v > 0 for v in row["img_s_repeats"]), row
        assert row["cpu_percent"] >= 0 and row["peak_rss_mb"] > 0 and row["peak_pss_mb"] > 0, row
        assert row["peak_pss_mb"] >= row["start_pss_mb"] > 0, row
        assert row["vs_decode"] > 0 and row["vs_original"] > 0, row
        assert row["note"] and row["memory"], row
        if name.endswith("_epochs"):  # memory over whole epochs: one reading per epoch, equal epochs
            assert len(row["pss_per_epoch_mb"]) == 3 and min(row["pss_per_epoch_mb"]) > 0, row
            assert row["timed_images"] > 0 and row["timed_images"] % 3 == 0, row
        if name.endswith("_epochs"):  # memory over whole epochs: one reading per epoch
            assert len(row["pss_per_epoch_mb"]) == 3 and min(row["pss_per_epoch_mb"]) > 0, row
            assert row["timed_images"] == 3 * (len(row["rss_per_epoch_mb"]) and row["timed_images"] // 3), row
    # the work-limit rows ran, and each loader row is set against its own limit
    for name in ("limit_train", "limit_eval"):
        assert rows[name]["status"] == "ok" and rows[name]["img_s"] > 0 and rows[name]["processes"] == 1, rows[name]
    for name, row in rows.items():
        if row["group"] in ("loader", "memory") and row["status"] == "ok":
            want = "limit_train" if row.get("train", True) else "limit_eval"
            assert row["work_limit"] == want and row["vs_work_limit"] > 0, row
        if row["group"] == "loader" and row["status"] == "ok":  # on cpu: also measured in turns with its limit
            assert row["vs_work_limit_paired"] > 0 and len(row["paired_ratios"]) == 3, row
            assert min(row["paired_img_s"]) > 0 and min(row["paired_work_limit_img_s"]) > 0, row
            assert report["summary"]["vs_work_limit"][name] == row["vs_work_limit"]
    assert report["summary"]["work_limit_train_img_s"] == rows["limit_train"]["img_s"]
    # self-blending on, in turns with the same loader without it: a ratio per pair, pseudo-fakes counted
    sbi = rows["sbi_on"]
    assert sbi["self_blend"] == 0.5 and sbi["vs_no_self_blend"] > 0 and len(sbi["self_blend_ratios"]) == 1, sbi
    assert 0 < sbi["pseudo_fake_share"] < 1 and rows["sbi_off"]["img_s"] > 0
    # the figures are each row's own, not copies of one another
    assert rows["decode"]["vs_decode"] == 1.0 and rows["original"]["vs_original"] == 1.0
    assert rows["read"]["mb_s"] > 0
    assert rows["decode"]["processes"] == 1 and rows["read"]["timed_images"] == 2 * 4
    assert rows["pack_100"]["files"] == 80 and rows["pack_25"]["files"] == 20
    summary = report["summary"]
    assert summary["decode_img_s"] == rows["decode"]["img_s"]
    assert summary["pack_vs_decode_files"] > 0 and summary["pack_pss_growth_100_vs_25"] > 0
    if rows["stall_fed"]["status"] == "ok":
        assert summary["best_train_loader"] in ("dali_train", "torch_train")
        assert rows["stall_fed"]["backend"] == rows[summary["best_train_loader"]]["backend"]
        assert rows["stall_fed"]["stall_percent"] == summary["stall_percent"]
        assert rows["stall_synthetic"]["model"] == "deepfakenet_tiny"
    manifest = json.loads((packed / "manifest.json").read_text())
    assert report["data"]["num_samples"] == manifest["splits"]["train"]["num_samples"]
    assert report["machine"]["cpus"] >= 1
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("deepfake-bench-pack-*")), "the packer row left its temp dir"


def test_rows_without_their_inputs_are_skipped_with_reasons(packed, tmp_path, caplog):
    """(--device cuda without CUDA is refused before any row: tests/test_messages_edges.py.)"""
    caplog.set_level(logging.INFO)
    out_json = tmp_path / "b.json"
    rc = main(["--data", str(packed), "--device", "cpu", "--rows", "original,pack", *TINY, "--json", str(out_json)])
    assert rc == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["name"] for r in rows] == ["original", "pack_25", "pack_100", "decode_files"]
    for r in rows:
        assert r["status"] == "skipped" and "img_s" not in r and "--images-real" in r["reason"], r
    assert "skipped" in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["--data", "{missing}"], "no such pack output folder"),
    (["--data", "{packed}", "--split", "test"], "no 'test' split"),
    (["--data", "{packed}", "--images-real", "{packed}"], "go together"),
    (["--data", "{packed}", "--images-real", "{missing}", "--images-fake", "{missing}"], "not a folder"),
    (["--data", "{packed}", "--rows", "stall", "--model", "resnet9000"], "--model 'resnet9000'"),
])
def test_bad_inputs_exit_2_with_one_line(packed, tmp_path, caplog, argv, message):
    argv = [a.format(packed=packed, missing=tmp_path / "nope") for a in argv]
    assert main(argv + ([] if "--rows" in argv else ["--rows", "read"])) == 2
    assert message in caplog.text


@pytest.mark.parametrize("flag, value", [("--rows", "read,bogus"), ("--backends", "tf"), ("--batch-size", "0"),
                                         ("--device", "tpu"), ("--workers", "-1")])
def test_bad_flags_name_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        get_args_parser().parse_args(["--data", "x", flag, value])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, str(REPO / "pipeline" / "bench.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for action in get_args_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.option_strings[0] in out.stdout
            assert action.help and action.help.strip()
