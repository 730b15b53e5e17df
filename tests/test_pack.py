"""shard_tools/pack.py end to end on real tiny JPEGs: round trip, dedup, conflicts, split, order, reruns."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import make_face, make_image_dirs, pack_dirs, write_image
from PIL import Image

from shard_tools.pack import main as pack_main

REPO = Path(__file__).resolve().parents[1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_back(out: Path, split: str):
    """Samples of a split in shard order, read with webdataset (no decoding)."""
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["name"]) for s in manifest["splits"][split]["shards"]]
    if not urls:
        return []
    return list(wds.WebDataset(urls, shardshuffle=False))


def shard_files(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx")}


def test_packed_fixture_round_trip(packed: Path):
    real, fake = packed.parent / "images" / "real", packed.parent / "images" / "fake"
    originals = {sha(p): (p.read_bytes(), 0, p.name) for p in real.iterdir()}
    originals.update({sha(p): (p.read_bytes(), 1, p.name) for p in fake.iterdir()})
    manifest = json.loads((packed / "manifest.json").read_text())
    seen = {}
    for split in ("train", "val"):
        samples = read_back(packed, split)
        assert len(samples) == manifest["splits"][split]["num_samples"]
        assert len(manifest["splits"][split]["shards"]) >= 2
        for s in samples:
            meta = json.loads(s["json"])
            data, label, name = originals[meta["sha256"]]
            assert s["jpg"] == data, "original bytes must be kept"
            assert int(s["cls"]) == label == meta["label"]
            assert meta["source"] == name and s["__key__"] == meta["sha256"][:32]
            assert meta["normalized"] is None and meta["format"] == "jpeg" and (meta["width"], meta["height"]) == (48, 48)
            assert meta["sha256"] not in seen, "a sample in two places"
            seen[meta["sha256"]] = split
    assert set(seen) == set(originals)
    for split in ("train", "val"):
        for s in manifest["splits"][split]["shards"]:
            assert (packed / s["index"]).read_text().startswith(f"v1.2 {s['num_samples']}\n")
    assert manifest["counts"]["real"] == {"found": 40, "kept": 40, "skipped": 0, "duplicates": 0, "reasons": {}}
    assert [p.name for p in packed.iterdir() if p.name.startswith(".tmp-")] == []


def test_tar_members_and_metadata(packed: Path):
    import tarfile

    with tarfile.open(packed / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name.split(".", 1)[1] for m in members[:3]] == ["cls", "jpg", "json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def test_dedup_and_conflicts(tmp_path: Path):
    real, fake = make_image_dirs(tmp_path / "in", n_real=10, n_fake=10)
    for i in range(3):  # 3 duplicates of r0000 inside the real class, names sorting after it
        shutil.copy(real / "r0000.jpg", real / f"zz_copy{i}.jpg")
    shutil.copy(real / "r0001.jpg", fake / "f_conflict.jpg")  # same bytes under both labels
    out = pack_dirs(real, fake, tmp_path / "out", "--min-shards", "1")
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["real"]["duplicates"] == 3 and m["counts"]["real"]["found"] == 13
    assert m["counts"]["real"]["kept"] == 9 and m["counts"]["fake"]["kept"] == 10
    assert m["counts"]["real"]["reasons"] == {"label-conflict": 1} == m["counts"]["fake"]["reasons"]
    (dup,) = m["duplicates"]
    assert dup["kept"].endswith("r0000.jpg") and len(dup["dropped"]) == 3
    (conflict,) = m["conflicts"]
    assert conflict["sha256"] == sha(real / "r0001.jpg")
    assert conflict["real"][0].endswith("r0001.jpg") and conflict["fake"][0].endswith("f_conflict.jpg")
    packed_shas = {json.loads(s["json"])["sha256"] for sp in ("train", "val") for s in read_back(out, sp)}
    assert conflict["sha256"] not in packed_shas and dup["sha256"] in packed_shas and len(packed_shas) == 19


def test_split_stable_when_files_are_added(tmp_path: Path):
    real, fake = make_image_dirs(tmp_path / "in", n_real=30, n_fake=30, seed=3)

    def splits(out):
        return {json.loads(s["json"])["sha256"]: sp for sp in ("train", "val") for s in read_back(out, sp)}

    before = splits(pack_dirs(real, fake, tmp_path / "a", "--min-shards", "1"))
    rng = np.random.default_rng(99)
    for i in range(25):
        write_image(real / "new" / f"n{i}.jpg", make_face(rng, 32))
        write_image(fake / f"a_new{i}.jpg", make_face(rng, 32, fake=True))  # sorts before the old ones
    after = splits(pack_dirs(real, fake, tmp_path / "b", "--min-shards", "1"))
    assert len(after) == len(before) + 50
    assert {k: after[k] for k in before} == before
    assert 0 < sum(v == "val" for v in after.values()) < len(after)


def test_classes_mixed_in_every_window(tmp_path: Path):
    real, fake = make_image_dirs(tmp_path / "in", n_real=150, n_fake=90, size=16, seed=5)
    out = pack_dirs(real, fake, tmp_path / "out", "--min-size", "8", "--shard-size", "40", "--min-shards", "2")
    m = json.loads((out / "manifest.json").read_text())
    labels = np.array([int(s["cls"]) for s in read_back(out, "train")])
    assert len(labels) == m["splits"]["train"]["num_samples"] >= 150
    p = labels.mean()
    for i in range(len(labels) - 63):
        n_fake = labels[i:i + 64].sum()
        assert abs(n_fake - 64 * p) <= 2, (i, n_fake, 64 * p)
    sizes = [s["num_samples"] for s in m["splits"]["train"]["shards"]]
    assert max(sizes) - min(sizes) <= 1 and len(sizes) >= 2
    val = m["splits"]["val"]
    assert 0.1 < val["classes"]["real"] / 150 < 0.3 and 0.1 < val["classes"]["fake"] / 90 < 0.35


def test_byte_identical_reruns_any_worker_count(tmp_path: Path):
    real, fake = make_image_dirs(tmp_path / "in", n_real=20, n_fake=20)
    a = pack_dirs(real, fake, tmp_path / "a", "--shard-size", "6")
    b = pack_main(["--real", str(real), "--fake", str(fake), "--out", str(tmp_path / "b"), "--workers", "2",
                   "--shard-size", "6"])
    assert b == 0
    fa, fb = shard_files(a), shard_files(tmp_path / "b")
    assert fa == fb and len(fa) >= 8
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, tmp_path / "b"))
    assert ma["splits"] == mb["splits"]


def test_refuses_complete_output_and_overwrites(tmp_path: Path, caplog):
    real, fake = make_image_dirs(tmp_path / "in", n_real=8, n_fake=8)
    out = pack_dirs(real, fake, tmp_path / "out", "--min-shards", "1")
    before = shard_files(out)
    args = ["--real", str(real), "--fake", str(fake), "--out", str(out), "--workers", "1", "--min-shards", "1"]
    assert pack_main(args) == 2
    assert "--overwrite" in caplog.text and shard_files(out) == before
    assert pack_main(args + ["--overwrite"]) == 0 and shard_files(out) == before


def interrupted_pack(real: Path, fake: Path, out: Path, monkeypatch, *extra: str) -> None:
    """A pack that dies after writing its shards, before its manifest (as a crash would)."""
    import shard_tools.pack as pack_module

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(pack_module, "build_manifest", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            pack_main(["--real", str(real), "--fake", str(fake), "--out", str(out), "--workers", "1", *extra])
    assert not (out / "manifest.json").exists() and list(out.glob("*.tar")) and (out / ".deepfake-pack-run.json").exists()


def test_incomplete_output_is_rebuilt(tmp_path: Path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    real, fake = make_image_dirs(tmp_path / "in", n_real=8, n_fake=8)
    ref = shard_files(pack_dirs(real, fake, tmp_path / "ref", "--min-shards", "1"))
    out = tmp_path / "out"
    interrupted_pack(real, fake, out, monkeypatch, "--min-shards", "3")  # other flags: other shard names
    (out / ".tmp-train-000000.tar.abc123_x").write_bytes(b"half")  # a temp file of one of its outputs
    (out / ".deepfake-pack.lock").write_text("deepfake-pack pid 999999\n")  # left by a killed run
    pack_dirs(real, fake, out, "--min-shards", "1")
    assert "incomplete output, rebuilding" in caplog.text
    assert shard_files(out) == ref
    assert sorted(p.name for p in out.iterdir() if p.suffix not in (".tar", ".idx")) == ["manifest.json"]


def test_foreign_file_beside_an_interrupted_output_is_refused(tmp_path: Path, caplog, monkeypatch):
    real, fake = make_image_dirs(tmp_path / "in", n_real=8, n_fake=8)
    out = tmp_path / "out"
    interrupted_pack(real, fake, out, monkeypatch, "--min-shards", "1")
    (out / "notes.txt").write_text("not ours")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", str(out), "--workers", "1"]) == 2
    assert f"{out / 'notes.txt'}, which deepfake-pack did not write" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_kill_and_rerun_gives_identical_shards(tmp_path: Path):
    real, fake = make_image_dirs(tmp_path / "in", n_real=300, n_fake=300, size=32, seed=7)
    args = [sys.executable, str(REPO / "shard_tools" / "pack.py"), "--real", str(real), "--fake", str(fake),
            "--workers", "1", "--shard-size", "5", "--min-shards", "2"]
    ref = tmp_path / "ref"
    subprocess.run(args + ["--out", str(ref)], check=True, capture_output=True, timeout=300)
    out = tmp_path / "out"
    proc = subprocess.Popen(args + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("*.tar")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the packer finished before it could be killed"
    assert not (out / "manifest.json").exists() and list(out.glob("*.tar"))
    assert len(list(out.glob("*.tar"))) < len(list(ref.glob("*.tar")))
    rerun = subprocess.run(args + ["--out", str(out)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "incomplete output, rebuilding" in rerun.stderr
    assert shard_files(out) == shard_files(ref)
    assert not list(out.glob(".tmp-*"))


def test_csv_input(tmp_path: Path):
    rng = np.random.default_rng(11)
    root = tmp_path / "images"
    for i in range(6):
        write_image(root / f"a{i}.jpg", make_face(rng, 32, fake=i % 2 == 1))
    write_image(tmp_path / "outside.jpg", make_face(rng, 32))
    rows = ["image,label", "a0.jpg,REAL", "a1.jpg,fake", "a2.jpg,Real", "./a3.jpg,1", "a4.jpg,0", "sub/../a5.jpg,FAKE",
            "gone.jpg,REAL", "a0.jpg,maybe", "a1.jpg", "", "../outside.jpg,REAL", f"{tmp_path / 'outside.jpg'},FAKE",
            '"a2.jpg,REAL']
    data = ("\n".join(rows) + "\n").encode() + b"\xff\xfe.jpg,REAL\n"
    (tmp_path / "data.csv").write_bytes(data)
    out = tmp_path / "out"
    assert pack_main(["--csv", str(tmp_path / "data.csv"), "--images-root", str(root), "--out", str(out),
                      "--workers", "1", "--min-shards", "1"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    labels = {json.loads(s["json"])["source"]: int(s["cls"]) for sp in ("train", "val") for s in read_back(out, sp)}
    assert labels == {"a0.jpg": 0, "a1.jpg": 1, "a2.jpg": 0, "a3.jpg": 1, "a4.jpg": 0, "a5.jpg": 1}
    reasons = sorted((s["path"].rsplit("/", 1)[-1], s["reason"]) for s in m["skipped"])
    assert reasons == [("data.csv:10", "bad-csv-row"), ("data.csv:12", "outside-root"), ("data.csv:13", "outside-root"),
                       ("data.csv:14", "bad-csv-row"), ("data.csv:15", "bad-csv-row"), ("data.csv:9", "bad-csv-row"),
                       ("gone.jpg", "missing")]
    assert m["inputs"]["csv"] == str(tmp_path / "data.csv")
    assert not any("outside" in json.loads(s["json"])["source"] for sp in ("train", "val") for s in read_back(out, sp))


def test_strict_missing_input_and_nothing_packed(tmp_path: Path, caplog):
    real, fake = make_image_dirs(tmp_path / "in", n_real=4, n_fake=4)
    (fake / "broken.jpg").write_bytes(b"")
    out = tmp_path / "out"
    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", str(out), "--workers", "1", "--strict"]) == 2
    assert "broken.jpg" in caplog.text and "zero-byte" in caplog.text
    assert not out.exists() or not list(out.iterdir()), "--strict must fail before writing"
    assert pack_main(["--real", str(tmp_path / "nope"), "--fake", str(fake), "--out", str(out)]) == 2
    assert "--real" in caplog.text and "nope" in caplog.text
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello")
    assert pack_main(["--real", str(junk), "--out", str(out), "--workers", "1"]) == 2
    assert "nothing to pack" in caplog.text


@pytest.mark.parametrize("bad", [["--val-fraction", "1.5"], ["--shard-size", "0"], ["--workers", "0"], []])
def test_bad_flags_exit_2(tmp_path: Path, bad, capsys):
    base = ["--out", str(tmp_path / "o")] + (["--real", str(tmp_path)] if bad else [])
    with pytest.raises(SystemExit) as e:
        pack_main(base + bad)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (bad[0] if bad else "--real") in err


def test_help_runs_as_file_and_explains_flags():
    r = subprocess.run([sys.executable, str(REPO / "shard_tools" / "pack.py"), "--help"], capture_output=True,
                       text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    for flag in ("--real", "--fake", "--csv", "--images-root", "--val-fraction", "--seed", "--shard-size",
                 "--min-shards", "--workers", "--min-size", "--max-pixels", "--strict", "--overwrite", "--out"):
        assert flag in r.stdout
    text = " ".join(r.stdout.split())  # argparse wraps the epilog wherever the words fall
    assert "truncated" in text and "Exit codes" in text


def test_tar_bytes_match_tarfile(packed: Path):
    """The hand-built ustar stream is byte for byte what tarfile writes for the same members."""
    import io
    import tarfile

    src = packed / "val-000000.tar"
    buf = io.BytesIO()
    with tarfile.open(src) as tin, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tout:
        for m in tin:
            ti = tarfile.TarInfo(m.name)
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = m.size, 0, 0o644, 0, 0, "", ""
            tout.addfile(ti, tin.extractfile(m))
    assert buf.getvalue() == src.read_bytes()


def test_warns_when_classes_differ_in_format_or_size(tmp_path: Path, caplog):
    rng = np.random.default_rng(4)
    for i in range(6):
        write_image(tmp_path / "real" / f"r{i}.jpg", make_face(rng, 32))
        write_image(tmp_path / "fake" / f"f{i}.png", make_face(rng, 40, fake=True))
    out = pack_dirs(tmp_path / "real", tmp_path / "fake", tmp_path / "out", "--min-shards", "1")
    warnings = json.loads((out / "manifest.json").read_text())["warnings"]
    assert any("differ in format" in w for w in warnings) and any("differ in image size" in w for w in warnings)
    assert "shortcut" in caplog.text


def test_outputs_get_the_mode_open_would_give(tmp_path: Path):
    real, fake = make_image_dirs(tmp_path / "in", n_real=4, n_fake=4)
    old = os.umask(0o027)
    try:
        out = pack_dirs(real, fake, tmp_path / "out", "--min-shards", "1")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert {n for n in modes if n.endswith(".idx")} and set(modes.values()) == {0o640}, modes


def test_spelling_of_an_input_path_does_not_change_the_bytes(tmp_path: Path, monkeypatch):
    make_image_dirs(tmp_path / "faces", n_real=6, n_fake=6)
    monkeypatch.chdir(tmp_path)
    outs = []
    for i, (real, fake) in enumerate([("faces/real", "faces/fake"), ("faces/real/", "./faces//fake/"),
                                      ("./faces/real", "faces/./fake"), (str(tmp_path / "faces/real"), "faces/fake")]):
        outs.append(pack_dirs(Path(real) if i == 0 else real, fake, tmp_path / f"o{i}", "--min-shards", "1"))
    files = [shard_files(o) for o in outs]
    assert files[0] == files[1] == files[2] == files[3] and files[0]  # relative or absolute: the same bytes
    real, fake = str(tmp_path / "faces" / "real"), str(tmp_path / "faces" / "fake")
    roots = {json.loads(s["json"])["root"] for s in read_back(outs[1], "train")}
    assert roots <= {real, fake}
    inputs = [json.loads((o / "manifest.json").read_text())["inputs"] for o in outs]
    assert inputs[0] == inputs[1] == inputs[2] == inputs[3] == {"real": [real], "fake": [fake], "csv": None,
                                                                "images_root": None}


def camera_files(folder: Path, rng) -> dict:
    """MPO, TIFF and (where Pillow writes it) AVIF files; returns {name: expected normalized}."""
    from PIL import features

    a, b = make_face(rng, 40), make_face(rng, 40)
    Image.fromarray(a).save(folder / "stereo.mpo", format="MPO", save_all=True, append_images=[Image.fromarray(b)],
                            quality=90)
    Image.fromarray(make_face(rng, 40)).save(folder / "scan.tif", format="TIFF")
    expect = {"stereo.mpo": "mpo-first-frame", "scan.tif": "tiff"}
    if features.check("avif"):
        Image.fromarray(make_face(rng, 40)).save(folder / "phone.avif", format="AVIF")
        expect["phone.avif"] = "avif"
    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64)
    (folder / "phone.heic").write_bytes(heic)
    return expect


def test_camera_and_phone_formats_are_packed(tmp_path: Path):
    import cv2

    from shard_tools.imageio import load_rgb

    real, fake = make_image_dirs(tmp_path / "in", n_real=4, n_fake=4, size=40)
    expect = camera_files(real, np.random.default_rng(8))
    out = pack_dirs(real, fake, tmp_path / "out", "--min-shards", "1", "--val-fraction", "0")
    m = json.loads((out / "manifest.json").read_text())
    (heic,) = [s for s in m["skipped"] if s["path"].endswith("phone.heic")]
    assert heic["reason"] == "unsupported-format" and "no decoder" in heic["detail"]
    got = {}
    for s in read_back(out, "train"):
        meta = json.loads(s["json"])
        if meta["source"] in expect:
            got[meta["source"]] = (meta["normalized"], s)
    assert {k: v[0] for k, v in got.items()} == expect
    norm, s = got["stereo.mpo"]
    jpg = s["jpg"]  # the first image's own JPEG stream, not a re-encoding
    assert Image.open(io.BytesIO(jpg)).format == "JPEG" and len(jpg) < (real / "stereo.mpo").stat().st_size
    want = load_rgb(real / "stereo.mpo")  # PIL: frame 0 of the MPO file
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")), want)
    assert np.array_equal(cv2.cvtColor(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), want)
    assert np.array_equal(dali_cpu_decode(jpg), want)
    assert json.loads(s["json"])["format"] == "jpeg"
    for name in set(expect) - {"stereo.mpo"}:
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(got[name][1]["png"]))), load_rgb(real / name))


def dali_cpu_decode(data: bytes) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        return fn.decoders.image(fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True),
                                 device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (images,) = p.run()
    return np.asarray(images[0])


@pytest.mark.parametrize("fake_quality,warned", [(75, True), (95, False)])
def test_jpeg_quality_histogram_and_warning(tmp_path: Path, caplog, fake_quality, warned):
    rng = np.random.default_rng(6)
    for i in range(6):
        write_image(tmp_path / "real" / f"r{i}.jpg", make_face(rng, 32), quality=95)
        write_image(tmp_path / "fake" / f"f{i}.jpg", make_face(rng, 32, fake=True), quality=fake_quality)
    out = pack_dirs(tmp_path / "real", tmp_path / "fake", tmp_path / "out", "--min-shards", "1")
    m = json.loads((out / "manifest.json").read_text())
    assert m["histograms"]["real"]["jpeg_quality"] == {"95": 6}
    assert m["histograms"]["fake"]["jpeg_quality"] == {str(fake_quality): 6}
    found = [w for w in m["warnings"] if "JPEG quality" in w]
    assert bool(found) == warned and ("re-encode" in caplog.text) == warned
    if warned:
        assert "re-encode" in found[0] and "'95': 6" in found[0] and "'75': 6" in found[0]


def test_jpeg_quality_estimate_recovers_the_encoder_setting():
    from shard_tools.imageio import inspect_bytes

    face = make_face(np.random.default_rng(2), 32)
    for q in (10, 35, 50, 75, 90, 97, 100):
        buf = io.BytesIO()
        Image.fromarray(face).save(buf, "JPEG", quality=q)
        assert inspect_bytes(buf.getvalue()).jpeg_quality == q
