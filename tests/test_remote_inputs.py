"""``deepfake-pack --real s3://... --fake s3://...`` on moto's real S3 server: the driver lists the prefixes, the
workers (processes, or Ray tasks) read the objects. An S3 copy of a folder packs to the local folder's shards,
byte for byte once each sample's json names the URL as its ``root``; bad objects are skipped with their reason;
missing, denied and unlistable (HTTP) inputs and an --out inside an input are one-line errors; no secret
reaches the manifest."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from media_helpers import FACES, face_jpegs, face_rgb, scene, write_video

from helpers import make_face, make_image_dirs, write_image
from shard_tools import pack as pack_module
from shard_tools import storage
from shard_tools.pack import main as pack_main

pytestmark = pytest.mark.timeout(180)
SHARDS = ["--shard-size", "4", "--min-shards", "2", "--val-fraction", "0.3"]
FACE = ["--faces", "--frames", "3", "--face-size", "64"]
SECRET = "s3cr3t-never-in-the-manifest"
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason="needs ../shared/data/faces")


def upload_tree(folder: Path, url: str) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            storage.write_bytes(f"{url}/{p.relative_to(folder).as_posix()}", p.read_bytes())


def image_tree(root: Path) -> Path:
    """real/ and fake/ JPEGs, with a subfolder, names whose order differs between a walk and a plain key sort
    (``x/`` vs ``x.z.jpg``), hidden entries, a zero-byte file and a text file."""
    rng = __import__("numpy").random.default_rng(7)
    real, fake = make_image_dirs(root, n_real=10, n_fake=8)
    write_image(real / "x" / "y.jpg", make_face(rng, 32))
    write_image(real / "x.z.jpg", make_face(rng, 32))
    write_image(real / ".cache" / "k.jpg", make_face(rng, 32))
    (real / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (fake / "empty.jpg").write_bytes(b"")
    (fake / "notes.txt").write_text("not an image")
    return root


def pack(real: str, fake: str, out: Path | str, *extra: str) -> int:
    return pack_main(["--real", str(real), "--fake", str(fake), "--out", str(out), *SHARDS, *extra])


def tar_members(path: Path) -> List[Tuple[str, bytes]]:
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t]


def ustar(members: List[Tuple[str, bytes]]) -> bytes:
    """The tar `shard_tools.writer` writes for these members (its format is what tarfile writes for them)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o644, 0, "", ""
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def with_roots(members: List[Tuple[str, bytes]], roots: Dict[str, str]) -> List[Tuple[str, bytes]]:
    out = []
    for name, data in members:
        if name.endswith(".json"):
            meta = json.loads(data)
            meta["root"] = roots[meta["root"]]
            data = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        out.append((name, data))
    return out


def assert_same_pack(local: Path, remote: Path, roots: Dict[str, str]) -> dict:
    """``remote``'s shards are ``local``'s with each json ``root`` mapped by ``roots`` (folder → URL), byte for
    byte; the manifests agree but for the run's args and inputs, shard checksums and the paths of skips."""
    tars = sorted(p.name for p in local.glob("*.tar"))
    assert tars and tars == sorted(p.name for p in remote.glob("*.tar"))
    for name in tars:
        mapped = with_roots(tar_members(local / name), roots)
        assert ustar(mapped) == (remote / name).read_bytes(), name
        assert [m for m, _ in mapped] == [m for m, _ in tar_members(remote / name)]
    ml, mr = (json.loads((d / "manifest.json").read_text()) for d in (local, remote))
    text = json.dumps(ml)
    for folder, url in roots.items():
        text = text.replace(folder, url)
    ml = json.loads(text)
    for m in (ml, mr):
        for key in ("args", "inputs"):
            m.pop(key)
        for split in m["splits"].values():
            for shard in split["shards"]:
                shard.pop("sha256"), shard.pop("bytes")
    assert ml == mr
    return json.loads((remote / "manifest.json").read_text())


def test_s3_images_pack_like_the_local_folder(s3_bucket, s3_server, tmp_path, caplog):
    root = image_tree(tmp_path / "in")
    url = f"{s3_bucket}/data"
    upload_tree(root, url)
    assert pack(root / "real", root / "fake", tmp_path / "local", "--workers", "2") == 0
    opts = json.dumps({"endpoint_url": s3_server.endpoint, "key": "testing", "secret": SECRET})
    caplog.set_level("DEBUG")
    assert pack(f"{url}/real/", f"{url}/fake", tmp_path / "remote", "--workers", "2", "--storage-options", opts) == 0
    m = assert_same_pack(tmp_path / "local", tmp_path / "remote",
                         {str(root / "real"): f"{url}/real", str(root / "fake"): f"{url}/fake"})
    assert m["inputs"] == {"real": [f"{url}/real"], "fake": [f"{url}/fake"], "csv": None, "images_root": None}
    assert m["counts"]["real"]["kept"] == 12 and m["counts"]["fake"]["kept"] == 8
    assert sorted((s["path"].removeprefix(url), s["reason"]) for s in m["skipped"]) == [
        ("/fake/empty.jpg", "zero-byte"), ("/fake/notes.txt", "not-an-image"),
        ("/real/.DS_Store", "hidden"), ("/real/.cache", "hidden")]
    assert m["args"]["storage_options"] == ["endpoint_url", "key", "secret"]
    assert SECRET not in (tmp_path / "remote" / "manifest.json").read_text()
    assert SECRET not in caplog.text


def test_an_object_gone_after_listing_is_skipped_with_its_reason(s3_bucket, tmp_path, monkeypatch):
    real, fake = make_image_dirs(tmp_path / "in", n_real=5, n_fake=5)
    url = f"{s3_bucket}/data"
    upload_tree(tmp_path / "in", url)
    listed = pack_module.collect

    def collect_then_delete(*a, **kw):
        got = listed(*a, **kw)
        storage.remove_object(f"{url}/real/r0002.jpg")  # listed by the driver, gone when a worker reads it
        return got

    monkeypatch.setattr(pack_module, "collect", collect_then_delete)
    assert pack(f"{url}/real", f"{url}/fake", tmp_path / "out", "--workers", "1") == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["path"], s["reason"]) for s in m["skipped"]] == [(f"{url}/real/r0002.jpg", "missing")]
    assert m["counts"]["real"] == {"found": 5, "kept": 4, "skipped": 1, "duplicates": 0, "reasons": {"missing": 1}}


def test_missing_denied_and_unlistable_inputs_are_one_line(s3_bucket, s3_server, tmp_path, caplog, monkeypatch):
    real, fake = make_image_dirs(tmp_path / "in", n_real=3, n_fake=3)
    upload_tree(tmp_path / "in", f"{s3_bucket}/data")
    cases = [
        (f"{s3_bucket}/nothing-here", "no object under this prefix"),
        ("s3://no-such-bucket-for-this-test/real", "cannot list it"),
        ("https://127.0.0.1:9/real", "HTTP(S) has no listing"),
        (f"{s3_bucket}/data/real/r0000.jpg", "is an object, not a prefix"),
    ]
    for bad, says in cases:
        caplog.clear()
        assert pack(bad, fake, tmp_path / "out") == 2, bad
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "\n" not in errors[0] and bad in errors[0] and says in errors[0], errors
    for out in (f"{s3_bucket}/data/real", f"{s3_bucket}/data/real/shards", f"{s3_bucket}/data"):
        caplog.clear()
        assert pack(f"{s3_bucket}/data/real", f"{s3_bucket}/data/fake", out) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "choose an --out" in errors[0], errors
    assert storage.list_names(f"{s3_bucket}/data") == ["fake", "real"]  # nothing written into the inputs
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    s3_server.enforce_auth(True)
    try:
        caplog.clear()
        assert pack(f"{s3_bucket}/data/real", fake, tmp_path / "out") == 2
    finally:
        s3_server.enforce_auth(False)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "cannot list it" in errors[0] and "credentials" in errors[0], errors
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.tar"))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """root/real: 2 tiny face videos and a photo; root/fake: 1 video and a file that only starts like an MP4."""
    root = tmp_path_factory.mktemp("media")
    for label, n in (("real", 2), ("fake", 1)):
        (root / label / "clips").mkdir(parents=True)
        for i, face in enumerate(face_jpegs(label, n)):
            f = face_rgb(face, 150)
            write_video(root / label / "clips" / f"v{i}.mp4",
                        [scene([f], seed=i, at=[(40 + 6 * k, 60 + 2 * k)]) for k in range(6)])
    write_image(root / "real" / "photo.jpg", scene([face_rgb(face_jpegs("real", 1, 6)[0], 140)], at=[(150, 70)]))
    (root / "fake" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40)
    return root


@pytest.fixture(scope="module")
def media_local(media, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("media-local") / "out"
    assert pack(media / "real", media / "fake", out, *FACE, "--workers", "1") == 0
    return out


@needs_faces
def test_s3_photos_and_videos_with_faces_pack_like_the_local_folder(media, media_local, s3_bucket, tmp_path):
    url = f"{s3_bucket}/media"
    upload_tree(media, url)
    assert pack(f"{url}/real", f"{url}/fake", tmp_path / "remote", *FACE, "--workers", "2") == 0
    m = assert_same_pack(media_local, tmp_path / "remote",
                         {str(media / "real"): f"{url}/real", str(media / "fake"): f"{url}/fake"})
    assert m["faces"]["counts"]["real"]["videos"] == 2 and m["faces"]["counts"]["real"]["photos"] == 1
    assert [(s["path"], s["reason"]) for s in m["skipped"]] == [(f"{url}/fake/broken.mp4", "unreadable-video")]


@needs_faces
def test_s3_inputs_with_ray_are_read_by_the_tasks(ray_session, media, media_local, s3_bucket, tmp_path):
    url = f"{s3_bucket}/media"
    upload_tree(media, url)
    assert pack(f"{url}/real", f"{url}/fake", tmp_path / "remote", *FACE, "--ray") == 0
    assert_same_pack(media_local, tmp_path / "remote",
                     {str(media / "real"): f"{url}/real", str(media / "fake"): f"{url}/fake"})
    out = f"{s3_bucket}/packed"  # both sides on the bucket: inputs read and shards uploaded by the tasks
    assert pack(f"{url}/real", f"{url}/fake", out, *FACE, "--ray") == 0
    got = tmp_path / "got"
    for name in storage.list_names(out):
        storage.download_verified(f"{out}/{name}", got)
    assert_same_pack(media_local, got, {str(media / "real"): f"{url}/real", str(media / "fake"): f"{url}/fake"})
