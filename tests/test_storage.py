"""shard_tools/storage/ and pack/inspect on URLs, against real servers on 127.0.0.1 (tests/servers.py):
moto's S3 server (through s3fs/botocore) and an http.server (through fsspec's HTTP filesystem)."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
from servers import free_port

from shard_tools import storage
from shard_tools.format import MANIFEST
from shard_tools.inspect import main as inspect_main
from shard_tools.pack import main as pack_main
from shard_tools.storage import StorageError

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck CI run
FAST = {"connect_timeout": 2, "read_timeout": 1, "attempts": 2}  # failure tests must end in seconds


def _upload(packed: Path, url: str) -> list:
    files = sorted(p.name for p in packed.iterdir())
    storage.upload_folder(packed, url, files, workers=4)
    return files


def _fails(kind: str, fn, *args, **kwargs) -> StorageError:
    """Run ``fn``; assert it raises StorageError of ``kind`` within 10 s, with a one-line message."""
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        fn(*args, **kwargs)
    assert time.monotonic() - t0 < 10, f"took {time.monotonic() - t0:.1f}s"
    assert e.value.kind == kind, str(e.value)
    assert "\n" not in str(e.value) and str(e.value).startswith(e.value.url)
    return e.value


def _error_lines(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_pack_to_s3_then_inspect_verify(s3_bucket, image_dirs, caplog):
    caplog.set_level(logging.INFO)
    url = f"{s3_bucket}/runs/a"
    real, fake = image_dirs
    rc = pack_main(["--real", str(real), "--fake", str(fake), "--out", url, "--workers", "1", "--shard-size", "5",
                    "--min-shards", "1", "--storage-options", json.dumps({"attempts": 2})])
    assert rc == 0
    names = storage.list_names(url)
    assert MANIFEST in names and any(n.endswith(".tar") for n in names) and any(n.endswith(".idx") for n in names)
    assert not [n for n in names if n.startswith(".tmp-")] and ".deepfake-pack.lock" not in names
    manifest = storage.read_json(storage.join(url, MANIFEST))
    assert manifest["args"]["out"] == url and manifest["args"]["storage_options"] == ["attempts"]
    listed = {e["name"] for s in manifest["splits"].values() for e in s["shards"]}
    assert listed <= set(names)
    caplog.clear()
    assert inspect_main([url, "--verify"]) == 0
    assert f"verify: OK (24 samples, downloaded from {url} just now" in caplog.text


def test_corrupted_s3_object_is_named(s3_bucket, packed, caplog):
    url = f"{s3_bucket}/p"
    _upload(packed, url)
    fs, _ = storage.filesystem(url)
    key = f"{s3_bucket[5:]}/p/train-000001.tar"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 3] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    fs.pipe_file(f"{s3_bucket[5:]}/p/val-000000.tar", bytes(data[:2048]))  # shorter than the manifest says
    assert inspect_main([url, "--verify"]) == 1
    assert f"{url}/train-000001.tar: sha256 differs" in caplog.text
    assert f"{url}/val-000000.tar: 2048 bytes, manifest says" in caplog.text
    assert "deepfake-inspect-" not in caplog.text  # problems name the URL, not the temp folder


def test_remote_manifest_refused_without_overwrite(s3_bucket, packed, image_dirs, caplog):
    url = f"{s3_bucket}/p"
    _upload(packed, url)
    fs, _ = storage.filesystem(url)
    fs.pipe_file(f"{s3_bucket[5:]}/p/train-000099.tar", b"old shard")
    fs.pipe_file(f"{s3_bucket[5:]}/p/notes.txt", b"not ours")
    real, fake = image_dirs
    argv = ["--real", str(real), "--fake", str(fake), "--out", url, "--workers", "1", "--min-shards", "1"]
    assert pack_main(argv) == 2
    assert f"--out {url} already holds a complete pack output" in caplog.text
    assert storage.exists(storage.join(url, "train-000099.tar"))
    assert pack_main(argv + ["--overwrite"]) == 0
    names = storage.list_names(url)
    assert "train-000099.tar" not in names and "notes.txt" in names and "train-000002.tar" not in names
    assert storage.read_json(storage.join(url, MANIFEST))["splits"]["train"]["num_samples"] > 0


def test_unreachable_endpoint_is_one_line(s3_bucket, caplog):
    opts = {**FAST, "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    e = _fails("unreachable", storage.read_bytes, f"{s3_bucket}/x/{MANIFEST}", storage_options=opts)
    assert "endpoint_url" in str(e)
    _fails("unreachable", storage.read_bytes, f"http://127.0.0.1:{free_port()}/{MANIFEST}", storage_options=FAST)
    t0 = time.monotonic()  # the CLI with the default timeouts and attempts: a few seconds too
    assert inspect_main([f"{s3_bucket}/x", "--storage-options", json.dumps({"endpoint_url": opts["endpoint_url"]})]) == 2
    assert time.monotonic() - t0 < 20
    lines = _error_lines(caplog)
    assert len(lines) == 1 and f"{s3_bucket}/x/{MANIFEST}: cannot reach the server" in lines[0]


def test_missing_bucket_object_and_forbidden(s3_bucket, s3_server, caplog):
    gone = "s3://no-such-bucket-here"
    _fails("no-bucket", storage.read_bytes, f"{gone}/p/{MANIFEST}")
    _fails("no-bucket", storage.exists, f"{gone}/p/{MANIFEST}")
    assert inspect_main([f"{gone}/p"]) == 2
    assert _error_lines(caplog) == [f"error: {gone}/p/{MANIFEST}: bucket 'no-such-bucket-here' does not exist; "
                                    "create it or fix the URL"]
    _fails("not-found", storage.read_bytes, f"{s3_bucket}/nothing.json")
    assert storage.exists(f"{s3_bucket}/nothing.json") is False
    fs, _ = storage.filesystem(s3_bucket)
    fs.pipe_file(f"{s3_bucket[5:]}/a.bin", b"12345")
    s3_server.enforce_auth(True)  # the access key "testing" is unknown to moto's IAM: every call gets 403
    try:
        e = _fails("denied", storage.read_bytes, f"{s3_bucket}/a.bin")
        assert "AWS_ACCESS_KEY_ID" in str(e)
        _fails("denied", storage.exists, f"{s3_bucket}/a.bin")
    finally:
        s3_server.enforce_auth(False)
    assert storage.read_bytes(f"{s3_bucket}/a.bin") == b"12345"


def test_short_object_and_download_verified(s3_bucket, packed, tmp_path):
    url = f"{s3_bucket}/p"
    _upload(packed, url)
    manifest = json.loads((packed / MANIFEST).read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    dest = tmp_path / "cache"
    got = storage.download_verified(storage.join(url, entry["name"]), dest, size=entry["bytes"], sha256=entry["sha256"])
    assert got == dest / entry["name"] and got.read_bytes() == (packed / entry["name"]).read_bytes()
    # cached: a verified file is not fetched again (an unreachable endpoint does not matter)
    off = {**FAST, "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    assert storage.download_verified(storage.join(url, entry["name"]), dest, size=entry["bytes"],
                                     storage_options=off) == got
    fs, _ = storage.filesystem(url)
    short = f"{url}/train-000000.tar"
    fs.pipe_file(short[5:], (packed / "train-000000.tar").read_bytes()[:1000])
    empty = tmp_path / "empty"
    e = _fails("short", storage.download_verified, short, empty, size=entry["bytes"], sha256=entry["sha256"])
    assert f"1000 bytes, expected {entry['bytes']}" in str(e)
    assert not empty.exists() or list(empty.iterdir()) == []  # no half file, no temp left over
    _fails("short", storage.read_bytes, short, expected_size=entry["bytes"])
    other = manifest["splits"]["train"]["shards"][1]
    _fails("mismatch", storage.download_verified, storage.join(url, other["name"]), empty, sha256=entry["sha256"])
    assert list(empty.iterdir()) == []
    _fails("not-found", storage.download_verified, f"{url}/missing.tar", empty)
    assert list(empty.iterdir()) == []


def test_http_reads_manifest_and_shard_and_verifies(http_root, packed, tmp_path, caplog):
    folder, base = http_root
    shutil.copytree(packed, folder / "p")
    url = f"{base}/p"
    manifest = storage.read_json(storage.join(url, MANIFEST))
    entry = manifest["splits"]["val"]["shards"][0]
    assert storage.size(storage.join(url, entry["name"])) == entry["bytes"]
    got = storage.download_verified(storage.join(url, entry["name"]), tmp_path / "c", size=entry["bytes"],
                                    sha256=entry["sha256"])
    assert got.read_bytes() == (packed / entry["name"]).read_bytes()
    with storage.open_url(storage.join(url, entry["name"])) as f:
        assert f.read(512)[257:262] == b"ustar"  # a tar header
    caplog.set_level(logging.INFO)
    assert inspect_main([url, "--verify"]) == 0 and "verify: OK (80 samples, downloaded from" in caplog.text


def test_http_failures_are_one_line(http_root, packed, tmp_path):
    folder, base = http_root
    shutil.copy(packed / "train-000000.tar", folder / "s.tar")
    _fails("not-found", storage.read_bytes, f"{base}/nope.json", storage_options=FAST)
    assert storage.exists(f"{base}/nope.json", storage_options=FAST) is False
    e = _fails("denied", storage.read_bytes, f"{base}/forbidden/{MANIFEST}", storage_options=FAST)
    assert "HTTP 403" in str(e)
    _fails("denied", storage.exists, f"{base}/forbidden/{MANIFEST}", storage_options=FAST)
    _fails("short", storage.download_verified, f"{base}/truncated/s.tar", tmp_path / "d", storage_options=FAST)
    assert list((tmp_path / "d").iterdir()) == []
    _fails("timeout", storage.read_bytes, f"{base}/stall/x", storage_options={**FAST, "attempts": 1})
    _fails("read-only", storage.upload_folder, packed, f"{base}/up", [MANIFEST])


def test_upload_to_a_non_object_store_and_remove_pack(packed, tmp_path):
    url = f"file://{tmp_path}/remote"
    files = _upload(packed, url)
    assert sorted(p.name for p in (tmp_path / "remote").iterdir()) == files  # moved from temp names, none left
    assert storage.remove_pack(url, [MANIFEST, "train-000000.tar", "not-there.tar"]) == 2
    assert storage.list_names(url) == [n for n in files if n not in (MANIFEST, "train-000000.tar")]


def test_storage_options_flag_errors(capsys, tmp_path):
    with pytest.raises(ValueError, match="--storage-options must be a JSON object"):
        storage.parse_storage_options("{not json")
    with pytest.raises(ValueError, match="--storage-options: read_timeout must be a positive number"):
        storage.parse_storage_options('{"read_timeout": 0}')
    assert storage.parse_storage_options(None) == {} and storage.parse_storage_options('{"anon": true}') == {"anon": True}
    with pytest.raises(SystemExit) as e:
        pack_main(["--real", str(tmp_path), "--out", "s3://b/p", "--storage-options", "[1]"])
    assert e.value.code == 2 and "--storage-options must be a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pack_main(["--real", str(tmp_path), "--out", str(tmp_path / "o"), "--storage-options", '{"anon": true}'])
    assert "--storage-options is for a URL --out" in capsys.readouterr().err
