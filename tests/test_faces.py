"""The face stage on real files: videos written with PyAV from real face JPEGs of ../shared/data/faces, photos
with 0, 1 and 2 faces, the FaceForensics++ videos of ../shared/data/ffpp-dev, and every bad input's reason."""
from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from media_helpers import (FFPP, face_jpegs, face_rgb, scene, set_mp4_rotation, write_audio_only, write_empty_video,
                           write_video)

from helpers import write_image
from shard_tools.imageio import load_rgb
from tqdm import tqdm

from shard_tools.inspect import main as inspect_main
from shard_tools.verify import verify_shard
from shard_tools.media.groups import ffpp_groups, ffpp_identities, parse_rule
from shard_tools.media.stage import FaceSettings, extract
from shard_tools.media.video import BadMedia, evenly_spaced, sample_frames
from shard_tools.pack import main as pack_main

pytestmark = pytest.mark.skipif(not (FFPP.parent / "faces").is_dir(), reason="needs ../shared/data")
FAST = FaceSettings(frames=4, face_size=64)


def face_video(path: Path, face_file: Path, n: int = 12, seed: int = 0, **kw) -> Path:
    """``n`` frames of one real face JPEG drifting over a background."""
    f = face_rgb(face_file, 150)
    frames = [scene([f], seed=seed, at=[(40 + 6 * i, 60 + 2 * i)]) for i in range(n)]
    return write_video(path, frames, **kw)


def samples(out: Path) -> list:
    """(split, json) of every sample of a pack output."""
    rows = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".json"):
                    rows.append((tar.name.split("-")[0], json.loads(t.extractfile(m).read())))
    return rows


def test_frames_are_evenly_spaced_exact_and_keep_variable_frame_rate_times(tmp_path):
    pts = [0, 40, 90, 100, 300, 310, 320, 600, 650, 1000, 1010, 1500]  # ms, irregular
    frames = [np.full((64, 96, 3), 10 + 20 * i, np.uint8) for i in range(len(pts))]
    path = write_video(tmp_path / "vfr.mp4", frames, pts=pts)
    got = list(sample_frames(str(path), 5, max_pixels=10**7, max_frames=100))
    assert [f.index for f in got] == evenly_spaced(12, 5) == [1, 3, 6, 8, 10]
    assert [round(f.time, 3) for f in got] == [pts[f.index] / 1000 for f in got]
    assert all(abs(float(f.rgb.mean()) - (10 + 20 * f.index)) < 4 for f in got)  # the frame at that index
    assert [f.index for f in sample_frames(str(path), 50, max_pixels=10**7, max_frames=100)] == list(range(12))


def test_display_rotation_of_a_phone_video_is_applied(tmp_path):
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:, :32] = (255, 0, 0)  # left half red, right half blue
    frame[:, 32:] = (0, 0, 255)
    path = write_video(tmp_path / "phone.mp4", [frame] * 3)
    set_mp4_rotation(path, 90)
    (f,) = sample_frames(str(path), 1, max_pixels=10**7, max_frames=100)
    assert f.rgb.shape == (64, 48, 3)  # shown upright: turned 90 degrees clockwise, the left half is on top
    assert f.rgb[4, 24, 0] > 200 and f.rgb[60, 24, 2] > 200


def test_photos_with_zero_one_and_two_faces(tmp_path):
    big, small = (face_rgb(p, s) for p, s in zip(face_jpegs("real", 2, 2), (160, 140)))
    none = write_image(tmp_path / "none.png", scene([], seed=1))
    one = write_image(tmp_path / "one.png", scene([big], at=[(200, 80)]))
    two = write_image(tmp_path / "two.png", scene([big, small], at=[(30, 80), (300, 100)]))
    with pytest.raises(BadMedia, match="no-face"):
        extract(str(none), FAST)
    res = extract(str(one), FAST)
    assert res.kind == "photo" and len(res.crops) == 1
    x0, y0, x1, y1 = res.crops[0].meta["box"]
    assert 180 < (x0 + x1) / 2 < 380 and 60 < (y0 + y1) / 2 < 260  # around the pasted face
    assert len(extract(str(two), FAST).crops) == 1  # the largest only, by default
    both = extract(str(two), FaceSettings(frames=4, face_size=64, all_faces=True)).crops
    assert [c.meta["index"] for c in both] == [0, 1]
    assert both[0].meta["box"][0] < 200 < both[1].meta["box"][0]  # index 0 = the larger (left) face
    assert load_rgb(both[0].data).shape == (64, 64, 3)


def test_no_face_keep_gives_a_marked_centre_square(tmp_path):
    none = write_image(tmp_path / "none.png", scene([], seed=2))
    res = extract(str(none), FaceSettings(face_size=64, no_face="keep"))
    assert [c.meta["index"] for c in res.crops] == [-1] and res.crops[0].meta["box"] is None


def _bad_inputs(root: Path, face: Path) -> dict:
    """file name -> the reason the packer must give it."""
    good = face_video(root / "good.mp4", face, n=6)
    data = good.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) * 2 // 3])
    write_audio_only(root / "audio.mp4")
    write_video(root / "black.mp4", [np.zeros((240, 320, 3), np.uint8)] * 6)
    (root / "video_named.jpg").write_bytes(data)
    (root / "photo_named.mp4").write_bytes(face.read_bytes())
    face_video(root / "long.mp4", face, n=30)
    write_video(root / "huge.mp4", [np.zeros((720, 1280, 3), np.uint8)] * 2)
    (root / "empty.mp4").write_bytes(b"")
    write_empty_video(root / "no_frames.mp4")
    write_image(root / "anim.gif", np.zeros((64, 64, 3), np.uint8))
    (root / "loop").symlink_to(root)
    return {"no_frames.mp4": {"no-frames"}, "anim.gif": {"unsupported-format"}, "loop": {"symlink-loop"},"truncated.mp4": {"unreadable-video", "truncated"}, "audio.mp4": {"no-video-stream"},
            "black.mp4": {"no-face"}, "video_named.jpg": {"wrong-extension"}, "photo_named.mp4": {"wrong-extension"},
            "long.mp4": {"too-long"}, "huge.mp4": {"too-large"}, "empty.mp4": {"zero-byte", "unreadable-video"}}


def test_every_bad_input_is_skipped_with_its_reason(tmp_path):
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir(), fake.mkdir()
    expected = _bad_inputs(real, face_jpegs("real", 1)[0])
    face_video(fake / "f.mp4", face_jpegs("fake", 1)[0])
    out = tmp_path / "out"
    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", str(out), "--faces", "--frames", "3",
                      "--face-size", "64", "--max-video-frames", "20", "--max-pixels", "500000", "--workers", "1"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    for name, allowed in expected.items():
        assert reasons.get(name) in allowed, (name, reasons.get(name))
    assert "good.mp4" not in reasons and m["faces"]["counts"]["real"]["videos"] == 1
    assert m["counts"]["real"]["kept"] == 3 and m["faces"]["settings"]["frames"] == 3


def test_videos_need_faces_flag(tmp_path):
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir(), fake.mkdir()
    face_video(real / "v.mp4", face_jpegs("real", 1)[0], n=3)
    write_image(real / "a.png", face_rgb(face_jpegs("real", 1)[0], 64))
    write_image(fake / "b.png", face_rgb(face_jpegs("fake", 1)[0], 64))
    out = tmp_path / "out"
    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", str(out), "--workers", "1"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [(Path(s["path"]).name, s["reason"]) for s in m["skipped"]] == [("v.mp4", "video-needs-faces")]


def test_frames_of_a_video_never_cross_the_split_and_json_records_the_face(tmp_path):
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir(), fake.mkdir()
    for i, f in enumerate(face_jpegs("real", 4, 20)):
        face_video(real / f"r{i}.mp4", f, n=8, seed=i)
    for i, f in enumerate(face_jpegs("fake", 4, 20)):
        face_video(fake / f"f{i}.mp4", f, n=8, seed=10 + i)
    out = tmp_path / "out"
    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", str(out), "--faces", "--frames", "4",
                      "--face-size", "64", "--val-fraction", "0.5", "--min-shards", "1", "--workers", "2"]) == 0
    rows = samples(out)
    splits = defaultdict(set)
    for split, meta in rows:
        splits[meta["source"]].add(split)
        face = meta["face"]
        assert face["kind"] == "video" and face["frames"] == 4 and face["index"] == 0
        assert face["frame"] in evenly_spaced(8, 4) and len(face["box"]) == 4 and 0.5 <= face["score"] <= 1
        assert meta["group"] == f"file:{face['source_sha256']}" and (meta["width"], meta["height"]) == (64, 64)
    assert len(splits) == 8 and all(len(s) == 1 for s in splits.values())
    assert {s for v in splits.values() for s in v} == {"train", "val"}  # both splits used, videos whole
    assert len(rows) == 32
    assert inspect_main([str(out), "--verify"]) == 0


def test_inspect_verify_catches_a_group_in_two_splits(tmp_path):
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir(), fake.mkdir()
    for i in range(6):  # --group-by regex with a group that cannot be split: made to leak by editing a json
        write_image(real / f"p{i}_r.png", face_rgb(face_jpegs("real", 6)[i], 48))
        write_image(fake / f"p{i}_f.png", face_rgb(face_jpegs("fake", 6)[i], 48))
    out = tmp_path / "out"
    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", str(out), "--group-by", r"regex:^(p\d)",
                      "--val-fraction", "0.5", "--min-shards", "1", "--workers", "1"]) == 0
    rows = samples(out)
    by_group = defaultdict(set)
    for split, meta in rows:
        by_group[meta["group"]].add(split)
    assert len(by_group) == 6 and all(len(v) == 1 for v in by_group.values())
    assert inspect_main([str(out), "--verify"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["groups"]["rule"] == r"regex:^(p\d)" and m["groups"]["train"] + m["groups"]["val"] == 6
    # a val sample whose group was already met in train is a leak the verifier names
    val_entry = m["splits"]["val"]["shards"][0]
    (_, meta), = [r for r in samples(out) if r[0] == "val"][:1]
    with tqdm(disable=True) as bar:
        _, _, problems = verify_shard(out, val_entry, "val", {}, bar, {meta["group"]: "train"})
    assert any(f"group {meta['group']!r} is in split val and in train" in p for p in problems)


def test_group_by_csv_column_and_regex_misses(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    lines = ["image,label,person"]
    for i in range(8):
        kind = ("real", "fake")[i % 2]
        write_image(imgs / f"{i}.png", face_rgb(face_jpegs(kind, 8)[i], 48))
        lines.append(f"{i}.png,{kind.upper()},{'' if i == 7 else f'id{i // 4}'}")
    (imgs / "data.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert pack_main(["--csv", str(imgs / "data.csv"), "--out", str(out), "--group-by", "csv:person",
                      "--val-fraction", "0.5", "--min-shards", "1", "--workers", "1"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [(Path(s["path"]).name, s["reason"]) for s in m["skipped"]] == [("7.png", "no-group")]
    by_group = defaultdict(set)
    for split, meta in samples(out):
        by_group[meta["group"]].add(split)
    assert set(by_group) == {"csv:id0", "csv:id1"} and all(len(v) == 1 for v in by_group.values())
    with pytest.raises(ValueError, match="--group-by"):
        parse_rule("person")


def test_ffpp_names_join_identities():
    names = ["044.mp4", "945.mp4", "Deepfakes_044_945.mp4", "FaceSwap_720_672.mp4", "672.mp4", "999_1000.mp4",
             "1000.mp4", "NeuralTextures_1000_1234.mp4", "clip.mp4"]
    assert ffpp_identities("Face2Face_044_945.mp4") == ["044", "945"]
    assert ffpp_groups(names) == ["ffpp:044", "ffpp:044", "ffpp:044", "ffpp:672", "ffpp:672", "ffpp:1000",
                                  "ffpp:1000", "ffpp:1000", "ffpp:clip"]


def test_group_by_ffpp_keeps_the_six_identities_of_ffpp_dev_whole(tmp_path):
    out = tmp_path / "out"
    assert pack_main(["--real", str(FFPP / "real"), "--fake", str(FFPP / "fake"), "--out", str(out), "--faces",
                      "--frames", "1", "--face-size", "64", "--group-by", "ffpp", "--val-fraction", "0.5",
                      "--min-shards", "1", "--workers", "2"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["real"]["kept"] == 6 and m["counts"]["fake"]["kept"] == 14  # a face in every video
    split_of = defaultdict(set)
    for split, meta in samples(out):
        for identity in ffpp_identities(meta["source"]):
            split_of[identity].add(split)
    assert sorted(split_of) == ["044", "272", "396", "672", "720", "945"]
    assert all(len(s) == 1 for s in split_of.values())
    assert m["groups"]["train"] + m["groups"]["val"] == 3  # 044-945, 272-396, 672-720


def test_dlib_hog_detector_finds_the_same_faces(tmp_path):
    pytest.importorskip("dlib", reason="dlib-bin not installed (pip install -e '.[dlib]')")
    faces = [face_rgb(p, 150) for p in face_jpegs("real", 2, 2)]
    photo = write_image(tmp_path / "two.png", scene(faces, at=[(30, 80), (300, 100)]))
    crops = extract(str(photo), FaceSettings(detector="dlib-hog", all_faces=True, face_size=48)).crops
    centres = sorted((c.meta["box"][0] + c.meta["box"][2]) / 2 for c in crops)
    assert len(crops) == 2 and 30 < centres[0] < 180 and 300 < centres[1] < 450
    assert all(0.5 <= c.meta["score"] <= 1 for c in crops)
