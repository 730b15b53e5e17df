"""predict: files, folders (recursive) and bad files -> one row each; CSV/JSON/stdout; CLI errors."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import help_text, make_face, write_image
from PIL import Image

from pipeline import predict
from pipeline.augment.batch_ops import normalize, resize_uint8
from pipeline.checkpoint import load_checkpoint


def reference_p_fake(run: Path, paths: list[Path]) -> np.ndarray:
    """P(fake) computed by hand: Pillow decode, the eval resize, normalise, model, sigmoid."""
    model, meta = load_checkpoint(run)
    chw = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths]
    x = torch.stack([resize_uint8(c, meta["image_size"]) for c in chw])
    with torch.no_grad():
        return torch.sigmoid(model(normalize(x))[:, 0]).numpy()


@pytest.fixture
def inputs(tmp_path: Path) -> dict:
    rng = np.random.default_rng(7)
    folder = tmp_path / "photos"
    files = [write_image(folder / f"a{i}.jpg", make_face(rng, 56, fake=i % 2 == 1)) for i in range(5)]
    files += [write_image(folder / "sub" / "deeper" / f"b{i}.png", make_face(rng, 64, fake=i == 0)) for i in range(3)]
    (folder / "sub" / "broken.jpg").write_bytes(files[0].read_bytes()[:200])
    single = write_image(tmp_path / "single.webp", make_face(rng, 48, fake=True))
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is not a JPEG")
    return {"folder": folder, "files": files, "single": single, "bad": bad, "broken": folder / "sub" / "broken.jpg"}


def read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_files_folders_and_bad_files(trained, inputs, tmp_path):
    out = tmp_path / "preds.csv"
    rc = predict.main(["--checkpoint", str(trained), str(inputs["single"]), str(inputs["bad"]), str(inputs["folder"]),
                       "--out", str(out), "--batch-size", "3", "--workers", "1", "--device", "cpu", "--threshold", "0.4"])
    assert rc == 0
    rows = read_csv(out.read_text())
    assert list(rows[0]) == ["path", "p_fake", "label", "error", "path_bytes_hex", "kind", "frames", "faces", "frame",
                             "time", "face"]
    assert all(r["path_bytes_hex"] == "" for r in rows)  # every path here is plain UTF-8
    by_path = {r["path"]: r for r in rows}
    good = [inputs["single"], *inputs["files"]]
    assert set(by_path) == {str(p) for p in good} | {str(inputs["bad"]), str(inputs["broken"])}
    assert by_path[str(inputs["bad"])]["error"].startswith("not-an-image")
    assert by_path[str(inputs["broken"])]["error"].startswith("truncated")
    for p in (inputs["bad"], inputs["broken"]):
        assert by_path[str(p)]["p_fake"] == "" and by_path[str(p)]["label"] == ""
    got = np.array([float(by_path[str(p)]["p_fake"]) for p in good])
    np.testing.assert_allclose(got, reference_p_fake(trained, good), atol=2e-6)  # CSV keeps 6 decimals
    for p in good:
        r = by_path[str(p)]
        assert r["error"] == ""
        assert r["label"] == ("fake" if float(r["p_fake"]) >= 0.4 else "real")


def test_json_output_and_stdout(trained, inputs, tmp_path, capsys):
    out = tmp_path / "preds.json"
    args = ["--checkpoint", str(trained / "best.safetensors"), str(inputs["folder"]), str(inputs["bad"]),
            "--workers", "0", "--device", "cpu"]
    assert predict.main([*args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == len(inputs["files"]) + 2 and report["n_errors"] == 2
    assert report["model"] == "deepfakenet_tiny" and report["threshold"] == 0.5
    bad = [r for r in report["predictions"] if r["error"]]
    assert {r["path"] for r in bad} == {str(inputs["bad"]), str(inputs["broken"])}
    assert all(r["p_fake"] is None and r["label"] is None for r in bad)
    ok = [r for r in report["predictions"] if not r["error"]]
    assert all(0.0 <= r["p_fake"] <= 1.0 and r["label"] in ("real", "fake") for r in ok)
    capsys.readouterr()
    assert predict.main(args) == 0
    rows = read_csv(capsys.readouterr().out)  # CSV on stdout, logs elsewhere
    assert len(rows) == report["n"]
    by_json = {r["path"]: r["p_fake"] for r in ok}
    for r in rows:
        if r["path"] in by_json:
            assert float(r["p_fake"]) == pytest.approx(by_json[r["path"]], abs=1e-6)


def test_only_bad_files_exit_1(trained, inputs, tmp_path, caplog):
    out = tmp_path / "p.csv"
    assert predict.main(["--checkpoint", str(trained), str(inputs["bad"]), "--out", str(out), "--workers", "0",
                         "--device", "cpu"]) == 1
    assert len(read_csv(out.read_text())) == 1
    assert f"could not read {inputs['bad']}: not-an-image" in caplog.text


def test_cli_errors(trained, tmp_path, caplog, capsys):
    text = help_text(predict.main, capsys)
    for flag in ("--checkpoint", "--out", "--threshold", "--batch-size", "--device", "--workers", "PATH"):
        assert flag in text
    assert predict.main(["--checkpoint", str(trained), str(tmp_path / "nope.jpg"), "--device", "cpu"]) == 2
    assert f"{tmp_path / 'nope.jpg'}: no such file or folder" in caplog.text
    assert predict.main(["--checkpoint", str(tmp_path / "none.safetensors"), str(tmp_path), "--device", "cpu"]) == 2
    assert "none.safetensors: no such checkpoint" in caplog.text
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(trained), str(tmp_path), "--out", str(tmp_path / "p.txt")])
    assert e.value.code == 2
    assert "must end in .csv or .json" in capsys.readouterr().err
