"""Hostile inputs to deepfake-pack and deepfake-inspect: each case asserts the exit code, that the error is ONE
line naming the file or flag, that nothing outside the tool's own outputs changed (the inputs, a foreign file
and, when the run fails, the output folder: snapshots before/after), and that no half-written file looks whole.

Cases are small functions ``case(tmp, env) -> Spec``, registered with ``@case(...)`` and parametrized.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
from helpers import make_image_dirs

from shard_tools.inspect import main as inspect_main
from shard_tools.pack import main as pack_main

REPO = Path(__file__).resolve().parents[1]
LOCK, MARKER = ".deepfake-pack.lock", ".deepfake-pack-run.json"


@dataclass
class Spec:
    """What to run and what must come out: ``names`` must all appear in the one error line."""

    argv: List[str]
    rc: int
    names: List[str] = field(default_factory=list)
    tool: str = "pack"
    out: Optional[Path] = None  # the tool's output folder (pack) or file (inspect --grid)
    multi: bool = False  # --verify: one error line per problem, each naming what is wrong


@dataclass
class Env:
    real: Path
    fake: Path
    complete: Path  # a complete pack output of real + fake (a private copy)


CASES: Dict[str, Callable[[Path, Env], Spec]] = {}


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def pack_argv(env: Env, out: Path, *extra: str) -> List[str]:
    return ["--real", str(env.real), "--fake", str(env.fake), "--out", str(out), "--workers", "1", "--min-shards", "1",
            *extra]


def snapshot(root: Path, skip: Optional[Path] = None) -> dict:
    """Every entry under ``root`` (hidden ones too): mode and bytes, link target, or 'dir'."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath) == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if skip is not None and p == skip:
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                snap[str(p)] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                snap[str(p)] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                snap[str(p)] = (stat.S_IMODE(st.st_mode), p.read_bytes() if stat.S_ISREG(st.st_mode) else "special")
    return snap


# ---------------------------------------------------------------- deepfake-pack: the output folder


def foreign_in_out(filename: str, content: bytes = b"mine"):
    def build(tmp: Path, env: Env) -> Spec:
        out = tmp / "out"
        (out / filename).parent.mkdir(parents=True, exist_ok=True)
        (out / filename).write_bytes(content)
        return Spec(pack_argv(env, out), 2, [str(out / filename.split("/")[0]), "did not write"], out=out)
    return build


for _name in ("train-2023-backup.tar", "val-1.idx", ".tmp-mydraft.txt", "notes.txt", "train-000000.tar",
              ".tmp-train-000000.tar.short", "sub/keep.jpg"):
    case(f"out-holds-{_name.replace('/', '-')}")(foreign_in_out(_name))


@case("out-foreign-manifest-with-overwrite")
def _(tmp, env):
    out = tmp / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "someone else's", "files": ["a.tar"]}))
    return Spec(pack_argv(env, out, "--overwrite"), 2, [str(out / "manifest.json"), "not a deepfake-pack manifest"],
                out=out)


@case("out-manifest-not-json-with-overwrite")
def _(tmp, env):
    out = tmp / "out"
    out.mkdir()
    (out / "manifest.json").write_bytes(b"\x00\xff not json")
    return Spec(pack_argv(env, out, "--overwrite"), 2, [str(out / "manifest.json")], out=out)


@case("out-complete-without-overwrite")
def _(tmp, env):
    return Spec(pack_argv(env, env.complete), 2, [str(env.complete), "--overwrite"], out=env.complete)


@case("out-complete-plus-foreign-file-with-overwrite")
def _(tmp, env):
    (env.complete / "README.txt").write_text("my notes about these shards")
    return Spec(pack_argv(env, env.complete, "--overwrite"), 2, [str(env.complete / "README.txt")], out=env.complete)


@case("out-manifest-lists-a-path-outside-with-overwrite")
def _(tmp, env):
    m = json.loads((env.complete / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["name"] = "../foreign.txt"
    (env.complete / "manifest.json").write_text(json.dumps(m))
    return Spec(pack_argv(env, env.complete, "--overwrite"), 2, ["'../foreign.txt'", "not a file name"],
                out=env.complete)


@case("out-marker-lists-a-foreign-name")
def _(tmp, env):
    out = tmp / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / MARKER).write_text(json.dumps({"tool": "deepfake-pack", "outputs": ["notes.txt"]}))
    return Spec(pack_argv(env, out), 2, [str(out / MARKER), "'notes.txt'"], out=out)


@case("out-lock-file-not-ours")
def _(tmp, env):
    out = tmp / "out"
    out.mkdir()
    (out / LOCK).write_text("my own lock, do not touch\n")
    return Spec(pack_argv(env, out), 2, [str(out / LOCK), "not a deepfake-pack lock file"], out=out)


@case("out-lock-is-a-symlink")
def _(tmp, env):
    out = tmp / "out"
    out.mkdir()
    os.symlink(tmp / "foreign.txt", out / LOCK)
    return Spec(pack_argv(env, out), 2, [str(out / LOCK)], out=out)


@case("out-is-a-file")
def _(tmp, env):
    return Spec(pack_argv(env, tmp / "foreign.txt"), 2, [f"--out {tmp / 'foreign.txt'}", "is a file"])


@case("out-below-a-file")
def _(tmp, env):
    return Spec(pack_argv(env, tmp / "foreign.txt" / "out"), 2, [str(tmp / "foreign.txt")])


@case("out-being-written-by-another-pack")
def _(tmp, env):
    out = tmp / "out"
    out.mkdir()
    (out / LOCK).write_text(f"deepfake-pack pid {os.getpid()}\n")
    fd = os.open(out / LOCK, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # released when the test process's fd closes (see run_case)
    HELD.append(fd)
    return Spec(pack_argv(env, out), 2, [f"--out {out} is being written by another deepfake-pack (pid {os.getpid()})"],
                out=out)


HELD: List[int] = []


# ---------------------------------------------------------------- deepfake-pack: inputs and output apart


@case("out-inside-real")
def _(tmp, env):
    return Spec(pack_argv(env, env.real / "shards"), 2, [f"--out {env.real / 'shards'} is inside --real {env.real}"])


@case("out-is-fake")
def _(tmp, env):
    return Spec(pack_argv(env, env.fake), 2, [f"--out {env.fake} is --fake {env.fake}"])


@case("real-inside-out")
def _(tmp, env):
    return Spec(pack_argv(env, env.real.parent), 2, [f"--real {env.real} is inside --out {env.real.parent}"])


@case("images-root-inside-out")
def _(tmp, env):
    (tmp / "data.csv").write_text("r0000.jpg,REAL\n")
    return Spec(["--csv", str(tmp / "data.csv"), "--images-root", str(env.real), "--out", str(env.real.parent),
                 "--workers", "1"], 2, [f"--images-root {env.real} is inside --out"])


@case("csv-row-inside-out-strict")
def _(tmp, env):
    (tmp / "data.csv").write_text("in/real/r0000.jpg,REAL\ncomplete/train-000000.tar,FAKE\n")
    return Spec(["--csv", str(tmp / "data.csv"), "--out", str(env.complete), "--overwrite", "--workers", "1",
                 "--strict"], 2, ["data.csv:2", "is inside --out"], out=env.complete)


@case("real-dotdot-after-a-symlink")
def _(tmp, env):
    (tmp / "elsewhere" / "deep").mkdir(parents=True)
    os.symlink(tmp / "elsewhere" / "deep", env.real.parent / "link")
    spelled = f"{env.real.parent}/link/../real"  # through the link: elsewhere/real, which does not exist
    (tmp / "elsewhere" / "real").mkdir()
    return Spec(["--real", spelled, "--fake", str(env.fake), "--out", str(tmp / "out")], 2,
                [f"--real {spelled}", "without '..'"], out=tmp / "out")


# ---------------------------------------------------------------- deepfake-pack: inputs


@case("real-missing")
def _(tmp, env):
    return Spec(["--real", str(tmp / "nope"), "--out", str(tmp / "out")], 2, [f"--real {tmp / 'nope'}: no such folder"],
                out=tmp / "out")


@case("real-is-a-file")
def _(tmp, env):
    return Spec(["--real", str(tmp / "foreign.txt"), "--out", str(tmp / "out")], 2, ["--real", "is not a folder"],
                out=tmp / "out")


@case("real-empty-path")
def _(tmp, env):
    return Spec(["--real", "", "--out", str(tmp / "out")], 2, ["--real ''"], out=tmp / "out")


@case("csv-missing")
def _(tmp, env):
    return Spec(["--csv", str(tmp / "no.csv"), "--out", str(tmp / "out")], 2, [f"--csv {tmp / 'no.csv'}: no such file"],
                out=tmp / "out")


@case("csv-is-a-folder")
def _(tmp, env):
    return Spec(["--csv", str(env.real), "--out", str(tmp / "out")], 2, [f"--csv {env.real}", "not a regular file"],
                out=tmp / "out")


@case("csv-is-a-fifo")
def _(tmp, env):
    os.mkfifo(tmp / "pipe.csv")  # reading it would block forever
    return Spec(["--csv", str(tmp / "pipe.csv"), "--out", str(tmp / "out")], 2, ["--csv", "not a regular file"],
                out=tmp / "out")


@case("images-root-missing")
def _(tmp, env):
    (tmp / "data.csv").write_text("a.jpg,REAL\n")
    return Spec(["--csv", str(tmp / "data.csv"), "--images-root", str(tmp / "nope"), "--out", str(tmp / "out")], 2,
                [f"--images-root {tmp / 'nope'}"], out=tmp / "out")


def csv_case(rows: bytes, line: int, what: str):
    def build(tmp: Path, env: Env) -> Spec:
        (tmp / "data.csv").write_bytes(b"r0000.jpg,REAL\n" + rows)
        return Spec(["--csv", str(tmp / "data.csv"), "--images-root", str(env.real), "--out", str(tmp / "out"),
                     "--workers", "1", "--strict"], 2, [f"data.csv:{line}", what], out=tmp / "out")
    return build


case("csv-dotdot-row-strict")(csv_case(b"../fake/f0000.jpg,FAKE\n", 2, "outside-root"))
case("csv-absolute-row-strict")(csv_case(b"/etc/hostname,FAKE\n", 2, "outside-root"))
case("csv-not-utf8-row-strict")(csv_case(b"r0001.jpg,REAL\n\xff\xfe,FAKE\n", 3, "not UTF-8"))
case("csv-nul-row-strict")(csv_case(b"r0\x00001.jpg,REAL\n", 2, "NUL"))
case("csv-bad-quoting-strict")(csv_case(b'"r0001.jpg,REAL\n', 2, "bad-csv-row"))
case("csv-bad-label-strict")(csv_case(b"r0001.jpg,MAYBE\n", 2, "label 'MAYBE'"))


@case("csv-only-bad-rows")
def _(tmp, env):
    (tmp / "data.csv").write_bytes(b"../x.jpg,REAL\nimage\n\xff,1\n")
    return Spec(["--csv", str(tmp / "data.csv"), "--out", str(tmp / "out")], 2, ["nothing to pack"], out=tmp / "out")


@case("strict-with-a-corrupt-image")
def _(tmp, env):
    (env.fake / "half.jpg").write_bytes((env.fake / "f0000.jpg").read_bytes()[:200])
    return Spec(pack_argv(env, tmp / "out", "--strict"), 2, [str(env.fake / "half.jpg"), "truncated"], out=tmp / "out")


@case("nothing-but-junk")
def _(tmp, env):
    (tmp / "junk").mkdir()
    (tmp / "junk" / "a.jpg").write_text("not an image")
    return Spec(["--real", str(tmp / "junk"), "--out", str(tmp / "out")], 2, ["nothing to pack"], out=tmp / "out")


for _flags, _named in ((["--val-fraction", "1.5"], "--val-fraction"), (["--shard-size", "0"], "--shard-size"),
                       (["--workers", "0"], "--workers"), (["--min-size", "0"], "--min-size"),
                       (["--allow-outside-root"], "--allow-outside-root"), (["--images-root", "x"], "--images-root"),
                       (["--seed", "abc"], "--seed")):
    def _flag_case(tmp, env, flags=_flags, named=_named):
        return Spec(pack_argv(env, tmp / "out", *flags), 2, [named], out=tmp / "out")
    case(f"flag{_flags[0]}")(_flag_case)


# ---------------------------------------------------------------- recoverable: must succeed and touch only its own files


@case("ok-stale-lock-of-a-killed-run")
def _(tmp, env):
    out = tmp / "out"
    out.mkdir()
    (out / LOCK).write_text("deepfake-pack pid 999999\n")
    return Spec(pack_argv(env, out), 0, out=out)


@case("ok-overwrite-removes-only-its-own-files")
def _(tmp, env):
    return Spec(pack_argv(env, env.complete, "--overwrite", "--shard-size", "100"), 0, out=env.complete)


@case("ok-csv-outside-root-allowed")
def _(tmp, env):
    (tmp / "data.csv").write_text(f"r0000.jpg,REAL\n../fake/f0000.jpg,FAKE\n{env.fake / 'f0001.jpg'},1\n")
    return Spec(["--csv", str(tmp / "data.csv"), "--images-root", str(env.real), "--allow-outside-root", "--out",
                 str(tmp / "out"), "--workers", "1", "--min-shards", "1"], 0, out=tmp / "out")


# ---------------------------------------------------------------- deepfake-inspect


def edit_manifest(out: Path, edit) -> None:
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))


def inspect_spec(env: Env, rc: int, names: List[str], *extra: str, grid: Optional[Path] = None, multi=False) -> Spec:
    argv = [str(env.complete), *extra] + (["--grid", str(grid), "--thumb", "16"] if grid is not None else [])
    return Spec(argv, rc, names, tool="inspect", out=grid, multi=multi)


@case("inspect-no-manifest")
def _(tmp, env):
    (env.complete / "manifest.json").unlink()
    return inspect_spec(env, 2, [str(env.complete / "manifest.json"), "is missing"], "--verify")


@case("inspect-manifest-not-utf8")
def _(tmp, env):
    (env.complete / "manifest.json").write_bytes(b"\xff\xfe{")
    return inspect_spec(env, 2, [str(env.complete / "manifest.json"), "not a deepfake-pack manifest"], "--verify")


@case("inspect-manifest-splits-a-list")
def _(tmp, env):
    edit_manifest(env.complete, lambda m: m.update(splits=[1, 2]))
    return inspect_spec(env, 2, ["not a deepfake-pack manifest", "no 'splits' object"], "--verify")


@case("inspect-manifest-shard-outside-out")
def _(tmp, env):
    edit_manifest(env.complete, lambda m: m["splits"]["train"]["shards"][0].update(name="../foreign.txt"))
    return inspect_spec(env, 2, ["splits.train.shards[0]", "'../foreign.txt' is not a file name"], "--verify")


@case("inspect-manifest-count-not-a-number")
def _(tmp, env):
    edit_manifest(env.complete, lambda m: m["splits"]["val"].update(num_samples="many"))
    return inspect_spec(env, 2, ["splits.val", "is not a count"], "--verify")


@case("inspect-counts-of-odd-types")
def _(tmp, env):
    edit_manifest(env.complete, lambda m: m.update(counts={"real": 3}, warnings="none", conflicts=None))
    return inspect_spec(env, 0, [])


@case("verify-indexes-swapped")
def _(tmp, env):
    a, b = env.complete / "train-000000.idx", env.complete / "train-000001.idx"
    assert a.read_text().split("\n")[0] == b.read_text().split("\n")[0]  # same count: the header cannot tell
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    return inspect_spec(env, 1, [f"{a}: 2 of 2 sample lines do not match the members of train-000000.tar"], "--verify",
                        multi=True)


@case("verify-index-is-binary")
def _(tmp, env):
    (env.complete / "train-000000.idx").write_bytes(bytes(range(256)))
    return inspect_spec(env, 1, [f"{env.complete / 'train-000000.idx'}: not a DALI index"], "--verify", multi=True)


@case("verify-shard-is-gzipped")
def _(tmp, env):
    import gzip

    shard = env.complete / "train-000000.tar"
    shard.write_bytes(gzip.compress(shard.read_bytes()))
    return inspect_spec(env, 1, [f"{shard}: cannot read the tar"], "--verify", multi=True)


@case("verify-shard-is-a-folder")
def _(tmp, env):
    shard = env.complete / "val-000000.tar"
    shard.unlink()
    shard.mkdir()
    return inspect_spec(env, 1, [f"{shard}: shard listed in the manifest is missing"], "--verify", multi=True)


@case("grid-shard-is-garbage")
def _(tmp, env):
    (env.complete / "train-000000.tar").write_bytes(b"\x00garbage" * 300)
    return inspect_spec(env, 1, ["--grid", "train-000000.tar", "could not be drawn"], grid=tmp / "sheet.png")


@case("grid-shard-missing")
def _(tmp, env):
    (env.complete / "train-000000.tar").unlink()
    return inspect_spec(env, 1, ["--grid", "train-000000.tar"], grid=tmp / "sheet.png")


@case("grid-onto-the-manifest")
def _(tmp, env):
    return inspect_spec(env, 2, ["would overwrite the pack output's own manifest.json"],
                        grid=env.complete / "manifest.json")


@case("grid-not-a-png-name")
def _(tmp, env):
    return inspect_spec(env, 2, [f"--grid {env.real / 'r0000.jpg'}: expected a .png"], grid=env.real / "r0000.jpg")


@case("grid-onto-a-file-that-is-not-a-png")
def _(tmp, env):
    (tmp / "notes.png").write_text("my notes, not a picture")
    return inspect_spec(env, 2, [f"--grid {tmp / 'notes.png'} exists and is not a PNG"], grid=tmp / "notes.png")


@case("grid-is-a-folder")
def _(tmp, env):
    (tmp / "sheet.png").mkdir()
    return inspect_spec(env, 2, [f"--grid {tmp / 'sheet.png'} is a folder"], grid=tmp / "sheet.png")


@case("grid-below-a-file")
def _(tmp, env):
    return inspect_spec(env, 2, ["cannot write --grid", str(tmp / "foreign.txt")], grid=tmp / "foreign.txt" / "s.png")


for _flags, _named in ((["--n", "0"], "--n"), (["--thumb", "4"], "--thumb"), (["--thumb", "100000"], "--thumb"),
                       (["--n", "x"], "--n")):
    def _inspect_flag_case(tmp, env, flags=_flags, named=_named):
        return Spec([str(env.complete), *flags], 2, [named], tool="inspect")
    case(f"inspect-flag{_flags[0]}-{_flags[1]}")(_inspect_flag_case)


@case("ok-grid-replaces-its-own-earlier-sheet")
def _(tmp, env):
    assert inspect_main([str(env.complete), "--grid", str(tmp / "sheet.png"), "--thumb", "16"]) == 0
    return inspect_spec(env, 0, [], "--verify", grid=tmp / "sheet.png")


# ---------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    real, fake = make_image_dirs(root / "in", n_real=3, n_fake=3)
    assert pack_main(["--real", str(real), "--fake", str(fake), "--out", str(root / "complete"), "--workers", "1",
                      "--min-shards", "2"]) == 0  # train: 2 shards of 2 samples
    return root


def setup_env(base: Path, tmp: Path) -> Env:
    shutil.copytree(base / "in", tmp / "in")
    shutil.copytree(base / "complete", tmp / "complete")
    (tmp / "foreign.txt").write_text("a file no tool may change")
    return Env(tmp / "in" / "real", tmp / "in" / "fake", tmp / "complete")


def run_cli(spec: Spec, caplog, capsys) -> tuple:
    """(exit code, error lines): ERROR log records, or argparse's own error line."""
    main = pack_main if spec.tool == "pack" else inspect_main
    caplog.clear()
    try:
        rc = main(spec.argv)
    except SystemExit as e:  # argparse: usage, then one "prog: error: ..." line
        err = capsys.readouterr().err.strip().splitlines()
        return e.code, [line for line in err if ": error: " in line]
    return rc, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def state(path: Optional[Path]):
    if path is None or not os.path.lexists(path):
        return None
    return snapshot(path) if path.is_dir() else (stat.S_IMODE(path.stat().st_mode), path.read_bytes())


def check_outputs(spec: Spec, before) -> None:
    out = spec.out
    if out is None:
        return
    if spec.tool == "inspect":
        if spec.rc == 2:
            assert state(out) == before, "a refused --grid changed its path"
        elif out.exists():  # written whole or not at all
            from PIL import Image

            with Image.open(out) as im:
                im.load()
                assert im.format == "PNG"
        return
    if spec.rc != 0:
        assert state(out) == before, "a failed run changed its output folder"
        return
    names = sorted(p.name for p in out.iterdir())
    m = json.loads((out / "manifest.json").read_text())
    listed = sorted(n for s in m["splits"].values() for e in s["shards"] for n in (e["name"], e["index"]))
    assert names == sorted(listed + ["manifest.json"]), "left something that is neither listed nor the manifest"
    assert inspect_main([str(out), "--verify"]) == 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile(name: str, base: Path, tmp_path: Path, caplog, capsys):
    env = setup_env(base, tmp_path)
    spec = CASES[name](tmp_path, env)
    out_before = state(spec.out)
    watched = snapshot(tmp_path, skip=spec.out)
    temps = set(tmp_path.rglob(".tmp-*"))
    try:
        rc, errors = run_cli(spec, caplog, capsys)
    finally:
        while HELD:
            os.close(HELD.pop())
    assert rc == spec.rc, errors
    if spec.rc != 0:
        assert errors and all("\n" not in e for e in errors), errors
        assert len(errors) == 1 or spec.multi, errors
        for n in spec.names:
            assert any(n in e for e in errors), (n, errors)
    else:
        assert errors == []
    assert snapshot(tmp_path, skip=spec.out) == watched, "something outside the tool's outputs changed"
    check_outputs(spec, out_before)
    assert set(tmp_path.rglob(".tmp-*")) <= temps, "a temp file was left"


def test_at_least_30_cases():
    n_inspect = sum(1 for n in CASES if n.startswith(("inspect", "verify", "grid", "ok-grid")))
    assert len(CASES) - n_inspect >= 30 and n_inspect >= 20


def test_second_pack_as_a_process_fails_at_once(base: Path, tmp_path: Path):
    """A real second process: the lock is held by another process for as long as it runs."""
    env = setup_env(base, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'deepfake-pack pid {os.getpid()}\\n'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path)
        r = subprocess.run([sys.executable, str(REPO / "shard_tools" / "pack.py"), *pack_argv(env, out)],
                           capture_output=True, text=True, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert line == f"error: --out {out} is being written by another deepfake-pack (pid {holder.pid})"
    assert snapshot(tmp_path) == before


def test_output_is_surveyed_again_just_before_replacing(base: Path, tmp_path: Path, monkeypatch, caplog):
    """A file that appears in --out while the inputs are inspected stops the run before anything is removed."""
    import shard_tools.pack as pack_module

    env = setup_env(base, tmp_path)
    real_inspect = pack_module._inspect_all

    def inspect_then_meddle(*args, **kwargs):
        result = real_inspect(*args, **kwargs)
        (env.complete / "late.txt").write_text("appeared during the run")
        return result

    monkeypatch.setattr(pack_module, "_inspect_all", inspect_then_meddle)
    before = snapshot(env.complete)
    assert pack_main(pack_argv(env, env.complete, "--overwrite")) == 2
    assert str(env.complete / "late.txt") in caplog.text
    after = snapshot(env.complete)
    del after[str(env.complete / "late.txt")]
    assert after == before
