"""The face stage after packing: the checkpoint carries the framing, evaluate and predict crop photos and videos
the same way, and score videos by pooling their frames; deepfake-faces writes crops and previews."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from media_helpers import FFPP, face_jpegs, face_rgb, scene, write_video

from helpers import write_image
from pipeline.checkpoint import read_metadata
from pipeline.scoring.media import pool_frames
from pipeline.scoring.metrics import quiet_metrics
from pipeline.scoring.score import Scores, video_level
from shard_tools.faces import main as faces_main
from shard_tools.pack import main as pack_main

pytestmark = [pytest.mark.skipif(not (FFPP.parent / "faces").is_dir(), reason="needs ../shared/data"),
              pytest.mark.usefixtures("fresh_accelerate_state")]


def test_video_auc_differs_from_frame_auc_by_construction():
    # real video: one wild frame (0.9) among calm ones; fake video: every frame mildly fake (0.6)
    frames = {"real.mp4": [0.9, 0.1, 0.1, 0.1], "fake.mp4": [0.6, 0.6, 0.6, 0.6]}
    ids, sources, labels, scores, faces = [], [], [], [], []
    for src, ps in frames.items():
        for f, p in enumerate(ps):
            ids.append(f"{src}#{f}:0"), sources.append(src), labels.append(int(src == "fake.mp4")), scores.append(p)
            faces.append({"kind": "video", "frame": f, "index": 0})
    s = Scores(ids, sources, ["g"] * 8, np.array(labels), np.array(scores), faces)
    assert quiet_metrics(s.labels, s.scores)["roc_auc"] == pytest.approx(0.75)  # 12 of 16 pairs ordered
    v = video_level(s, "mean")
    assert v.ids == ["real.mp4", "fake.mp4"] and v.scores.tolist() == pytest.approx([0.3, 0.6])
    assert quiet_metrics(v.labels, v.scores)["roc_auc"] == 1.0
    assert video_level(s, "max").scores.tolist() == pytest.approx([0.9, 0.6])  # max pooling undoes it


def test_pooling_takes_the_largest_face_of_a_frame_and_the_confident_rule():
    s = Scores(["a#0:0", "a#0:1", "a#1:0"], ["a"] * 3, ["g"] * 3, np.array([1, 1, 1]), np.array([0.2, 0.8, 0.4]),
               [{"frame": 0, "index": 0}, {"frame": 0, "index": 1}, {"frame": 1, "index": 0}])
    assert video_level(s, "mean").scores.tolist() == pytest.approx([0.6])  # frames 0.8 and 0.4
    ps = np.array([0.9] * 12 + [0.3] * 8)
    assert pool_frames(ps, "confident") == pytest.approx(0.9)  # 12 > 11 and > 20/2.5 confident fakes
    assert pool_frames(np.array([0.05] * 19 + [0.9]), "confident") == pytest.approx(0.05)
    assert pool_frames(np.array([0.5, 0.7]), "confident") == pytest.approx(0.6)


def _videos(root: Path, kind: str, n: int, start: int) -> Path:
    root.mkdir(parents=True)
    for i, f in enumerate(face_jpegs(kind, n, start)):
        face = face_rgb(f, 150)
        write_video(root / f"{kind}{i}.mp4", [scene([face], seed=i, at=[(60 + 8 * k, 70)]) for k in range(6)])
    return root


@pytest.fixture(scope="module")
def face_run(tmp_path_factory):
    """A pack of face crops from 12 small videos and a tiny model trained on it (1 epoch)."""
    from pipeline.train import main as train_main

    root = tmp_path_factory.mktemp("facerun")
    real, fake = _videos(root / "real", "real", 6, 40), _videos(root / "fake", "fake", 6, 40)
    pack = root / "pack"
    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", str(pack), "--faces", "--frames", "3",
                      "--face-size", "48", "--val-fraction", "0.34", "--min-shards", "1", "--workers", "1"]) == 0
    run = root / "run"
    assert train_main(["--data", str(pack), "--out", str(run), "--cpu", "--backend", "torch", "--model",
                       "deepfakenet_tiny", "--image-size", "32", "--batch-size", "4", "--workers", "0",
                       "--epochs", "1", "--max-steps", "2"]) == 0
    return {"real": real, "fake": fake, "pack": pack, "run": run}


def test_checkpoint_carries_the_packs_face_settings(face_run):
    manifest = json.loads((face_run["pack"] / "manifest.json").read_text())
    meta = read_metadata(face_run["run"])
    assert meta["faces"] == manifest["faces"]["settings"] and meta["faces"]["frames"] == 3


def test_evaluate_scores_videos_through_the_checkpoints_face_stage(face_run, tmp_path):
    from pipeline.evaluate import main as evaluate_main

    out = tmp_path / "eval"
    assert evaluate_main(["--checkpoint", str(face_run["run"]), "--real", str(face_run["real"]), "--fake",
                          str(face_run["fake"]), "--out", str(out), "--workers", "0", "--device", "cpu"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["n"] == 36  # 12 videos x 3 frames, one face each
    assert report["video_metrics"]["n_files"] == 12 and report["video_metrics"]["pool"] == "mean"
    assert report["face_stage"]["frames"] == 3
    rows = list(csv.DictReader(io.StringIO((out / "video_scores.csv").read_text())))
    assert len(rows) == 12 and all(r["id"].endswith(".mp4") for r in rows)
    # the per-file score is the mean of that file's frame scores
    frames = list(csv.DictReader(io.StringIO((out / "scores.csv").read_text())))
    one = rows[0]["id"]
    mine = [float(r["score"]) for r in frames if r["source"] == one]
    assert len(mine) == 3 and float(rows[0]["score"]) == pytest.approx(np.mean(mine), abs=1e-5)
    out2 = tmp_path / "set"
    assert evaluate_main(["--checkpoint", str(face_run["run"]), "--set", f"vids={face_run['real']},{face_run['fake']}",
                          "--scoring", "resize", "--out", str(out2), "--workers", "0", "--device", "cpu"]) == 0
    sets = [r["set"] for r in json.loads((out2 / "metrics.json").read_text())["sets"]]
    assert sets == ["vids", "vids (video, mean)"]


@pytest.mark.timeout(120)
def test_the_face_stage_in_worker_processes_does_not_hang_and_scores_the_same(face_run, tmp_path):
    """evaluate forks no face-stage worker from its threaded process (a forked child once waited for ever on a
    barrier inherited from torch's OpenMP team, which the detector shares); 2 workers give the scores of 0."""
    import torch

    from pipeline.evaluate import main as evaluate_main

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as a real run: an OpenMP team of 2 exists in this process before the pool starts
    try:
        torch.ones(1 << 22).mul_(2).sum()
        scores = {}
        for workers in ("0", "2"):
            out = tmp_path / f"w{workers}"
            assert evaluate_main(["--checkpoint", str(face_run["run"]), "--set", f"v={face_run['real']},{face_run['fake']}",
                                  "--scoring", "resize", "--out", str(out), "--workers", workers, "--device", "cpu"]) == 0
            scores[workers] = json.loads((out / "metrics.json").read_text())["sets"]
    finally:
        torch.set_num_threads(threads)
    assert scores["2"] == scores["0"] and scores["0"][0]["n"] == 36


def test_predict_on_a_photo_and_a_video(face_run, tmp_path):
    from pipeline.predict import main as predict_main

    faces = [face_rgb(p, 150) for p in face_jpegs("real", 2, 2)]
    photo = write_image(tmp_path / "two_faces.png", scene(faces, at=[(30, 80), (300, 100)]))
    video = next(face_run["fake"].glob("*.mp4"))
    out = tmp_path / "p.csv"
    assert predict_main(["--checkpoint", str(face_run["run"]), str(photo), str(video), "--all-faces", "--per-frame",
                         "--out", str(out), "--workers", "0", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    files = [r for r in rows if r["frame"] == ""]
    assert [(Path(r["path"]).name, r["kind"], r["frames"], r["faces"]) for r in files] == [
        ("two_faces.png", "photo", "1", "2"), (video.name, "video", "3", "3")]
    per_face = [r for r in rows if r["frame"] != "" and r["path"] == str(photo)]
    assert sorted(r["face"] for r in per_face) == ["0", "1"]
    assert float(files[0]["p_fake"]) == pytest.approx(max(float(r["p_fake"]) for r in per_face), abs=1e-6)
    per_frame = [r for r in rows if r["frame"] != "" and r["path"] == str(video)]
    assert len(per_frame) == 3
    assert float(files[1]["p_fake"]) == pytest.approx(np.mean([float(r["p_fake"]) for r in per_frame]), abs=1e-5)
    heat = tmp_path / "heat"
    assert predict_main(["--checkpoint", str(face_run["run"]), str(photo), str(video), "--all-faces", "--explain",
                         str(heat), "--out", str(tmp_path / "h.csv"), "--workers", "0", "--device", "cpu"]) == 0
    index = list(csv.DictReader(io.StringIO((heat / "explanations.csv").read_text())))
    # one PNG per face crop: the photo's 2 faces, the video's 3 frames (numbered after predict's 2 rows)
    assert sorted(Path(r["path"]).name for r in index) == sorted(
        ["two_faces.png#0:0", "two_faces.png#0:1"] + [f"{video.name}#{f}:0" for f in
                                                       sorted({r["frame"] for r in per_frame})])
    assert all((heat / r["png"]).stat().st_size > 0 and r["png"][:5] >= "00002" for r in index)
    crop_scores = {Path(r["path"]).name: float(r["p_fake"]) for r in index}
    by_frame = {f"{video.name}#{r['frame']}:0": float(r["p_fake"]) for r in per_frame}
    assert all(crop_scores[k] == pytest.approx(v, abs=1e-4) for k, v in by_frame.items())
    off = tmp_path / "off.csv"
    assert predict_main(["--checkpoint", str(face_run["run"]), str(video), "--faces", "off", "--out", str(off),
                         "--workers", "0", "--device", "cpu"]) == 1
    (row,) = csv.DictReader(io.StringIO(off.read_text()))
    assert row["error"].startswith("video-needs-faces")


def test_deepfake_faces_writes_crops_jsonl_and_previews(tmp_path):
    vids = _videos(tmp_path / "in", "real", 2, 60)
    write_image(vids / "blank.png", scene([], seed=3))
    out = tmp_path / "faces"
    assert faces_main([str(vids), "--out", str(out), "--frames", "2", "--face-size", "48", "--preview",
                       "--workers", "1"]) == 0
    recs = [json.loads(line) for line in (out / "faces.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all((out / r["file"]).is_file() for r in recs)
    assert {r["source"] for r in recs} == {"in/real0.mp4", "in/real1.mp4"}
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["source"], s["reason"]) for s in skipped] == [("in/blank.png", "no-face")]
    assert sorted(p.name for p in (out / "preview" / "in").iterdir()) == ["real0.jpg", "real1.jpg"]
    assert faces_main([str(vids), "--out", str(out)]) == 2  # an earlier output needs --overwrite
    assert faces_main([str(vids), "--out", str(out), "--overwrite", "--frames", "1", "--workers", "1"]) == 0
    assert len((out / "faces.jsonl").read_text().splitlines()) == 2
