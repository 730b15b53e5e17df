"""Hostile inputs for train, evaluate, predict and export (issue 12).

Every case asserts the exit code; that the error is ONE line naming the file or flag; that nothing
outside the tool's own outputs changed (input trees snapshot before and after); and that no half
file looks whole (no ``.tmp-*`` leftovers, outputs absent or complete). CLIs run in-process through
``main(argv)``; as subprocesses where a crash, a signal or a resource limit is the point (a DALI
segfault, ``RLIMIT_FSIZE`` with SIGXFSZ ignored).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_image_dirs, one_error, usage_error, write_image

from model import create_model
from pipeline import evaluate, export, predict, train
from pipeline.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "deepfakenet_tiny", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--cpu"]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
ODD_NAMES = [b"\xff\xfe.jpg", b"new\nline.jpg", b"caf\xe9/ok.jpg", "tab\there.jpg".encode()]


# -- helpers -------------------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict:
    """Every entry under ``roots``: kind, mode and content hash (files), to compare before and after."""
    out = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(os.fsencode(root)):
            for name in dirs + files:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                digest = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) and not os.path.islink(p) else ""
                out[p] = (st.st_mode, st.st_size, digest)
    return out


def no_half_files(*roots: Path) -> None:
    for root in roots:
        leftovers = [p for p in Path(root).rglob(".tmp-*")] if Path(root).exists() else []
        assert not leftovers, leftovers


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def run_limited(args, fsize=None, timeout=240) -> subprocess.CompletedProcess:
    """``python -m`` a CLI in a subprocess; ``fsize`` bytes as RLIMIT_FSIZE with SIGXFSZ ignored (EFBIG instead)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", *args], env=env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if fsize else None, cwd=REPO)


def last_error(proc) -> str:
    """The subprocess's one error line (its last stderr line), checked to be a line of its own."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "\r" not in ln]
    assert lines and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


def checkpoint(path: Path, how: str = "ok") -> Path:
    """A tiny deepfakenet_tiny checkpoint (32 px): ``ok``, ``nan`` weights, or finite weights that ``overflow``."""
    torch.manual_seed(0)
    model = create_model("deepfakenet_tiny")
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if how == "nan" and name.endswith("weight") and t.ndim > 1:
                t.view(-1)[0] = float("nan")
                break
            if how == "overflow" and t.is_floating_point() and "running_var" not in name:
                t.fill_(3e38)
    return save_checkpoint(path, model, model_name="deepfakenet_tiny", image_size=32)


def corrupt_jpeg(tar: Path) -> None:
    raw = bytearray(tar.read_bytes())
    start = raw.index(b"\xff\xd8\xff")  # first JPEG member: same size, wrecked contents
    raw[start + 2:start + 600] = bytes(598)
    tar.write_bytes(bytes(raw))


def swap_index(pack: Path) -> None:
    a, b = pack / "val-000000.idx", pack / "val-000001.idx"
    ta, tb = a.read_bytes(), b.read_bytes()
    a.write_bytes(tb)
    b.write_bytes(ta)


@pytest.fixture(scope="module")
def world(tmp_path_factory, packed):
    """Read-only inputs shared by the cases: images, a checkpoint, bad checkpoints, and a copy of `packed`."""
    root = tmp_path_factory.mktemp("hostile")
    real, fake = make_image_dirs(root / "images", n_real=4, n_fake=4, size=40, seed=9)
    odd = root / "odd"  # names that are not UTF-8, or hold a newline or a tab
    for i, name in enumerate(ODD_NAMES):
        side, src = ("real", real) if i < 2 else ("fake", fake)
        path = os.path.join(os.fsencode(odd / side), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(sorted(src.iterdir())[i % 2], path)
    with open(os.path.join(os.fsencode(odd / "fake"), b"bad\x80.jpg"), "wb") as f:
        f.write(b"not an image")
    ckpt = {how: checkpoint(root / f"{how}.safetensors", how) for how in ("ok", "nan", "overflow")}
    return {"root": root, "real": real, "fake": fake, "odd": odd, "ckpt": ckpt, "packed": packed}


def cli_args(cli: str, w: dict, out: Path, ckpt: str = "ok") -> list:
    """A working command line of ``cli`` writing to ``out``."""
    c = str(w["ckpt"][ckpt])
    return {
        "evaluate": ["--checkpoint", c, "--real", str(w["real"]), "--fake", str(w["fake"]), "--workers", "0",
                     "--device", "cpu", "--out", str(out)],
        "predict": ["--checkpoint", c, str(w["real"]), "--workers", "0", "--device", "cpu", "--out", str(out)],
        "export": ["--checkpoint", c, "--onnx", str(out)],
    }[cli]


MAINS = {"evaluate": evaluate.main, "predict": predict.main, "export": export.main, "train": train.main}
OUT_NAME = {"evaluate": "eval", "predict": "p.csv", "export": "m.onnx", "train": "run"}


# -- outputs: refused before any work, one line -----------------------------------------------------
def _blocked(tmp: Path, how: str, name: str) -> Path:
    if how == "is-file":
        (tmp / name).write_text("mine")
        return tmp / name
    if how == "is-dir":
        (tmp / name).mkdir()
        (tmp / name / "keep.txt").write_text("mine")
        return tmp / name
    if how == "is-fifo":
        os.mkfifo(tmp / name)
        return tmp / name
    if how == "in-input":
        return None
    (tmp / "afile").write_text("mine")  # under-file / unwritable: the parent is a file / not writable
    return tmp / "afile" / name if how == "under-file" else tmp / "ro" / name


@pytest.mark.parametrize("cli, how, expect", [
    ("evaluate", "is-file", "is a file, not a folder"),
    ("evaluate", "under-file", "cannot create it: {tmp}/afile is a file"),
    ("evaluate", "unwritable", "cannot create it: {tmp}/ro is not writable"),
    ("predict", "is-dir", "is a folder; give a file name ending in .csv or .json"),
    ("predict", "under-file", "cannot create it: {tmp}/afile is a file"),
    ("predict", "is-fifo", "is not a regular file (a FIFO or device)"),
    ("export", "is-dir", "is a folder; give a file name ending in .onnx"),
    ("export", "under-file", "cannot create it: {tmp}/afile is a file"),
    ("train", "under-file", "cannot create it: {tmp}/afile is a file"),
    ("train", "unwritable", "cannot create it: {tmp}/ro is not writable"),
    ("evaluate", "in-input", "is inside --real {real}: the outputs would change an input"),
    ("predict", "in-input", "is inside PATH {real}: the outputs would change an input"),
    ("train", "in-input", "is inside --data {packed}: the outputs would change an input"),
])
def test_output_refused_before_any_work(world, tmp_path, monkeypatch, caplog, cli, how, expect):
    name = OUT_NAME[cli].replace("p.csv", "p.json" if how == "is-fifo" else "p.csv")
    out = _blocked(tmp_path, how, name) or (world["packed"] if cli == "train" else world["real"]) / name
    if how == "unwritable":
        (tmp_path / "ro").mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: os.fspath(p) != str(tmp_path / "ro") and real_access(p, m))
    def boom(*a, **k):
        raise AssertionError("work started before the output was checked")
    for module, attr in (("pipeline.evaluate", "load_checkpoint"), ("pipeline.predict", "load_checkpoint"),
                         ("pipeline.export", "load_checkpoint"), ("pipeline.training.setup", "build_loader"),
                         ("pipeline.training.setup", "build_model")):
        monkeypatch.setattr(f"{module}.{attr}", boom)
    argv = (["--data", str(world["packed"]), "--out", str(out), *TINY] if cli == "train"
            else cli_args(cli, world, out))
    before = snapshot(tmp_path, world["root"], world["packed"])
    assert MAINS[cli](argv) == 2
    msg = one_error(caplog)
    flag = "--onnx" if cli == "export" else "--out"
    assert f"{flag} {out}" in msg and expect.format(tmp=tmp_path, real=world["real"], packed=world["packed"]) in msg, msg
    assert snapshot(tmp_path, world["root"], world["packed"]) == before


# -- checkpoints that load as NaN, overflow, are cut short or are pickles ------------------------------
@pytest.mark.parametrize("cli", ["evaluate", "predict", "export"])
@pytest.mark.parametrize("how, expect", [
    ("nan", "has 1 NaN and 0 infinite values"),
    ("overflow", "output is NaN or infinite"),
    ("truncated", "not a safetensors file"),
    ("pickle", "not a safetensors file"),
])
def test_bad_checkpoint_refused(world, tmp_path, caplog, cli, how, expect):
    path = world["ckpt"]["nan" if how == "nan" else "overflow" if how == "overflow" else "ok"]
    if how in ("truncated", "pickle"):
        data = path.read_bytes()
        path = tmp_path / f"{how}.safetensors"
        if how == "truncated":
            path.write_bytes(data[: len(data) // 2])
        else:
            torch.save(create_model("deepfakenet_tiny").state_dict(), path)
    out = tmp_path / OUT_NAME[cli]
    argv = cli_args(cli, world, out)
    argv[argv.index("--checkpoint") + 1] = str(path)
    before = snapshot(world["root"])
    assert MAINS[cli](argv) == 2
    msg = one_error(caplog)
    assert str(path) in msg and expect in msg, msg
    assert not out.exists() and snapshot(world["root"]) == before
    no_half_files(tmp_path)


# -- usage errors: one line naming the flag, nothing read or written -----------------------------------
@pytest.mark.parametrize("cli, extra, expect", [
    ("evaluate", ["--fake", "{real}"], "--real {real} and --fake {real} are the same path"),
    ("evaluate", ["--fake", "{root}/images"], "overlap (one is inside the other)"),
    ("evaluate", ["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    ("evaluate", ["--threshold", "2"], "--threshold 2.0: must be in [0, 1]"),
    ("evaluate", ["--device", "tpu"], "--device 'tpu': expected cpu, cuda or cuda:N"),
    ("evaluate", ["--data", "x"], "give either --data, or --real and --fake, not both"),
    ("predict", ["--out", "{tmp}/p.txt"], "--out {tmp}/p.txt: the file name must end in .csv or .json"),
    ("predict", ["--workers", "-1"], "--workers -1: must be >= 0"),
    ("export", ["--image-size", "5000"], "--image-size 5000: must be a whole number of pixels in [32, 4096]"),
    ("export", ["--image-size", "16"], "--image-size 16: must be a whole number of pixels in [32, 4096]"),
    ("export", ["--onnx", "{tmp}/m.txt"], "--onnx {tmp}/m.txt: the file name must end in .onnx"),
    ("export", ["--opset", "99"], "--opset 99: the TorchScript exporter supports opsets 7 to 20"),
    ("train", ["--backend", "nope"], "argument --backend: invalid choice: 'nope'"),
])
def test_usage_error_is_one_line(world, tmp_path, capsys, cli, extra, expect):
    fmt = {"real": world["real"], "root": world["root"], "tmp": tmp_path}
    extra = [e.format(**fmt) for e in extra]
    argv = (["--data", str(world["packed"]), "--out", str(tmp_path / "run"), *TINY] if cli == "train"
            else cli_args(cli, world, tmp_path / OUT_NAME[cli]))
    if cli == "evaluate" and extra[0] == "--fake":
        argv = argv[:argv.index("--fake")] + argv[argv.index("--fake") + 2:]
    before = snapshot(tmp_path, world["root"])
    line = usage_error(capsys, MAINS[cli], argv + extra)
    assert ": error: " in line and line.endswith("(see --help)"), line
    assert expect.format(**fmt) in line, line
    assert snapshot(tmp_path, world["root"]) == before


@pytest.mark.parametrize("argv, expect", [
    (["--image-size", "5000"], "--image-size 5000: must be a whole number of pixels in [32, 4096]"),
    (["--image-size", "31"], "--image-size 31: must be a whole number of pixels in [32, 4096]"),
    (["--lr", "nan"], "--lr nan: must be a positive number"),
])
def test_train_config_error_is_one_line(world, tmp_path, caplog, argv, expect):
    assert train.main(["--data", str(world["packed"]), "--out", str(tmp_path / "run"), *TINY, *argv]) == 2
    assert expect in one_error(caplog) and not (tmp_path / "run").exists()


# -- file names that are not UTF-8 (or hold a newline or a tab) -----------------------------------------
def _rows_back(rows, key="path") -> set:
    """The paths the rows name, from path_bytes_hex when set, else from the text."""
    return {os.fsdecode(bytes.fromhex(r["path_bytes_hex"])) if r["path_bytes_hex"] else r[key] for r in rows}


def _walk(folder: Path) -> set:
    return {os.fsdecode(os.path.join(d, f)) for d, _, fs in os.walk(os.fsencode(folder)) for f in fs}


@pytest.mark.parametrize("fmt", ["csv", "json", "stdout"])
def test_predict_round_trips_any_file_name(world, tmp_path, capsysbinary, fmt):
    out = tmp_path / f"p.{fmt}"
    argv = ["--checkpoint", str(world["ckpt"]["ok"]), str(world["odd"]), "--workers", "0", "--device", "cpu"]
    assert predict.main(argv + ([] if fmt == "stdout" else ["--out", str(out)])) == 0
    data = capsysbinary.readouterr().out if fmt == "stdout" else out.read_bytes()
    text = data.decode("utf-8")  # strict: valid UTF-8 whatever the names
    rows = json.loads(text)["predictions"] if fmt == "json" else list(csv.DictReader(text.splitlines()))
    if fmt == "json":
        rows = [{**r, "path_bytes_hex": r["path_bytes_hex"] or ""} for r in rows]
    assert _rows_back(rows) == _walk(world["odd"])
    assert sum(bool(r["error"]) for r in rows) == 1 and all("\n" not in r["path"] for r in rows)


def test_evaluate_round_trips_any_file_name(world, tmp_path, caplog):
    out = tmp_path / "eval"
    before = snapshot(world["root"])
    assert evaluate.main(["--checkpoint", str(world["ckpt"]["ok"]), "--real", str(world["odd"] / "real"), "--fake",
                          str(world["odd"] / "fake"), "--workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "scores.csv").read_bytes().decode("utf-8").splitlines()))
    report = json.loads((out / "metrics.json").read_bytes().decode("utf-8"))
    skipped = [{**k, "path_bytes_hex": k["path_bytes_hex"] or ""} for k in report["skipped"]]
    assert _rows_back(rows, "source") | _rows_back(skipped) == _walk(world["odd"])
    assert sorted(os.listdir(out)) == ["metrics.json", "roc.png", "scores.csv", "scores.png"]
    assert all("\n" not in r.getMessage() for r in caplog.records) and snapshot(world["root"]) == before


# -- bad data: one line naming the file, never a traceback -----------------------------------------------
def _link_dotdot(w, tmp):
    os.symlink(w["real"], tmp / "link")
    return [str(tmp / "link" / "..")]


@pytest.mark.parametrize("case", ["no-manifest", "no-split", "one-class", "missing-path", "link-dotdot", "bomb"])
def test_bad_data_is_one_line(world, tmp_path, caplog, case):
    out = tmp_path / "out"
    ck = str(world["ckpt"]["ok"])
    common = ["--workers", "0", "--device", "cpu", "--out"]
    if case in ("no-manifest", "no-split"):
        pack = tmp_path / "pack"
        shutil.copytree(world["packed"], pack)
        if case == "no-manifest":
            (pack / "manifest.json").unlink()
        argv, expect = ["--checkpoint", ck, "--data", str(pack), "--backend", "torch", "--split",
                        "test" if case == "no-split" else "val", *common, str(out)], (
            "manifest.json is missing" if case == "no-manifest" else "no 'test' split")
        main, rc = evaluate.main, 2
    elif case == "one-class":  # every fake unreadable: AUC/EER undefined, nothing written
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "x.jpg").write_bytes(b"junk")
        argv, expect, main, rc = (["--checkpoint", ck, "--real", str(world["real"]), "--fake", str(bad), *common,
                                   str(out)], "no readable fake images", evaluate.main, 2)
    else:
        paths = {"missing-path": lambda: [str(tmp_path / "nope.jpg")], "link-dotdot": lambda: _link_dotdot(world, tmp_path),
                 "bomb": lambda: [str(write_image(tmp_path / "big.png", np.zeros((7000, 6000, 3), np.uint8)))]}[case]()
        argv = ["--checkpoint", ck, *paths, *common, str(tmp_path / "p.csv")]
        expect = {"missing-path": "nope.jpg: no such file or folder", "link-dotdot": "link/..: its '..' follows a symlink",
                  "bomb": "pixels > the limit of 40000000 pixels"}[case]
        main, rc = predict.main, (1 if case == "bomb" else 2)
    before = snapshot(world["root"], world["packed"])
    assert main(argv) == rc
    if case == "bomb":  # the file is skipped with its reason, which names no flag predict lacks
        row = next(csv.DictReader(open(tmp_path / "p.csv")))
        assert expect in row["error"] and "--" not in row["error"]
    else:
        msg = one_error(caplog)
        assert expect in msg and "--real" not in msg.replace("--real " + str(world["real"]), ""), msg
        assert not out.exists() and not (tmp_path / "p.csv").exists()
    assert snapshot(world["root"], world["packed"]) == before


def test_data_error_mid_epoch_is_one_line(world, tmp_path, caplog):
    pack = tmp_path / "pack"
    shutil.copytree(world["packed"], pack)
    corrupt_jpeg(pack / "train-000003.tar")
    before = snapshot(pack)
    assert train.main(["--data", str(pack), "--out", str(tmp_path / "run"), *TINY, "--epochs", "1",
                       "--backend", "torch"]) == 2
    msg = one_error(caplog)
    assert "train-000003.tar" in msg and "SHA-256" in msg, msg  # the shard's hash (issue 23), or a sample's
    assert (tmp_path / "run" / "config.json").exists()  # the run had started: the error came mid-epoch
    assert snapshot(pack) == before
    no_half_files(tmp_path)


# -- --resume of a damaged state -------------------------------------------------------------------------
class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def unfinished(world, tmp_path_factory):
    """A run stopped during epoch 2, with the state of epoch 1 saved."""
    from accelerate.state import AcceleratorState

    run = tmp_path_factory.mktemp("unfinished") / "run"

    def stop(epoch, step):
        if epoch == 2:
            raise _Stop()
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(_Stop):
        train.main(["--data", str(world["packed"]), "--out", str(run), *TINY, "--epochs", "2", "--max-steps", "1"],
                   on_step=stop)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert (run / "state" / "epoch_0001" / "progress.json").exists()
    return run


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("member, how", [("optimizer.bin", "cut"), ("optimizer.bin", "evil-pickle"),
                                         ("random_states_0.pkl", "cut"), ("model.safetensors", "cut"),
                                         ("progress.json", "garbage")])
def test_resume_of_damaged_state_is_refused(world, unfinished, tmp_path, caplog, monkeypatch, member, how):
    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    target = run / "state" / "epoch_0001" / member
    data = target.read_bytes()
    target.write_bytes({"cut": data[: len(data) // 2], "garbage": b"{not json",
                        "evil-pickle": pickle.dumps(_Evil())}.get(how))
    monkeypatch.chdir(tmp_path)
    before = snapshot(run)
    assert train.main(["--data", str(world["packed"]), "--out", str(run), *TINY, "--epochs", "2", "--max-steps", "1",
                       "--resume"]) == 2
    msg = one_error(caplog)
    assert f"the training state {run}/state/epoch_0001 is corrupt or incompatible" in msg and "another --out" in msg
    assert "weights_only" not in caplog.text and not (tmp_path / "EVIL_RAN").exists()
    assert snapshot(run) == before


# -- DALI: bad data is refused before DALI reads it (its decoder segfaults on it) -------------------------
@pytest.mark.parametrize("cli, damage", [("evaluate", "jpeg"), ("evaluate", "index"), ("train", "jpeg")])
def test_dali_refuses_bad_shards_without_crashing(world, tmp_path, cli, damage):
    pytest.importorskip("nvidia.dali")
    pack = tmp_path / "pack"
    shutil.copytree(world["packed"], pack)
    split = "train" if cli == "train" else "val"
    corrupt_jpeg(pack / f"{split}-000000.tar") if damage == "jpeg" else swap_index(pack)
    before = snapshot(pack)
    out = tmp_path / "out"
    if cli == "train":
        args = ["pipeline.train", "--data", str(pack), "--out", str(out), *TINY, "--epochs", "1", "--backend", "dali"]
    else:  # the default --batch-size 128 holds the whole split: a batch size where DALI 2.4 crashed (exit 139)
        args = ["pipeline.evaluate", "--checkpoint", str(world["ckpt"]["ok"]), "--data", str(pack), "--backend",
                "dali", "--workers", "1", "--device", "cpu", "--out", str(out)]
    proc = run_limited(args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    msg = last_error(proc)
    expect = ("val-000000.idx: 9 of 9 sample lines do not match the members of val-000000.tar" if damage == "index"
              else f"{split}-000000.tar: ")
    assert expect in msg and "--verify" in msg, msg
    assert snapshot(pack) == before and not (out / "metrics.json").exists() and not (out / "summary.json").exists()


@pytest.mark.parametrize("damage, expect", [("jpeg", "image bytes do not hash to json sha256"),
                                            ("index", "sample lines do not match the members")])
def test_inspect_verify_names_the_same_damage(world, tmp_path, capsys, caplog, damage, expect):
    from shard_tools.inspect import main as inspect_main

    pack = tmp_path / "pack"
    shutil.copytree(world["packed"], pack)
    corrupt_jpeg(pack / "val-000000.tar") if damage == "jpeg" else swap_index(pack)
    before = snapshot(pack)
    assert inspect_main([str(pack), "--verify"]) == 1
    assert expect in capsys.readouterr().out + caplog.text
    assert snapshot(pack) == before


# -- a full disk / file-size limit: one line naming the file, no half file, earlier outputs intact ---------
@pytest.mark.parametrize("case, fsize, expect", [
    ("train-checkpoint", 100_000, "cannot write checkpoint {out}/last.safetensors: file too large"),
    ("train-state", 700_000, "cannot write the training state {out}/state/epoch_0001: the write failed"),
    ("evaluate", 20_000, "cannot write {out}/roc.png: file too large"),
    ("predict", 60, "cannot write {out}: file too large"),
    ("export", 100_000, "cannot write {out}: file too large"),
])
def test_write_failure_is_one_line(world, tmp_path, case, fsize, expect):
    cli = case.split("-")[0]
    out = tmp_path / OUT_NAME[cli]
    if cli == "train":
        args = ["--data", str(world["packed"]), "--out", str(out), *TINY, "--epochs", "1", "--max-steps", "1",
                "--backend", "torch"]
    else:
        args = cli_args(cli, world, out)
    if cli == "evaluate":  # an earlier evaluation in --out: it must survive the failed one whole
        assert evaluate.main(args) == 0
    before = snapshot(out, world["root"]) if cli == "evaluate" else snapshot(world["root"])
    proc = run_limited([f"pipeline.{cli}", *args], fsize=fsize)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    msg = last_error(proc)
    assert expect.format(out=out) in msg, msg
    after = snapshot(out, world["root"]) if cli == "evaluate" else snapshot(world["root"])
    assert after == before
    no_half_files(tmp_path)
    if cli in ("predict", "export"):
        assert not out.exists()
    if case == "train-state":  # the epoch's checkpoint is whole; no state claims to be complete
        assert (out / "last.safetensors").stat().st_size > 100_000 and not list((out / "state").glob("epoch_*"))


# -- every flag an error message names exists on that command ----------------------------------------------
def test_error_messages_name_only_flags_the_command_has():
    import re

    def flags(main_module) -> set:
        return {s for a in main_module.get_args_parser()._actions for s in a.option_strings}

    owners = {  # files whose messages reach the user through these commands
        "pipeline/evaluate.py": ["evaluate"], "pipeline/predict.py": ["predict"], "pipeline/export.py": ["export"],
        "pipeline/scoring/cli.py": ["evaluate", "predict"], "pipeline/training/config.py": ["train"],
        "pipeline/training/loop.py": ["train"], "pipeline/training/rundir.py": ["train"],
        "pipeline/training/epoch.py": ["train"], "pipeline/scoring/score.py": ["evaluate"],
        "pipeline/training/setup.py": ["train"], "pipeline/training/sources.py": ["train"], "model/pretrained.py": ["train"],
        "pipeline/data/folders.py": ["evaluate", "predict"],
    }
    have = {name: flags({"evaluate": evaluate, "predict": predict, "export": export, "train": train}[name])
            for name in ("evaluate", "predict", "export", "train")}
    message = re.compile(r"(?:raise \w+\(|p\.error\(|logger\.(?:error|warning)\()\s*f?\"([^\"]*)\"")
    missing = []
    for path, clis in owners.items():
        for text in message.findall((REPO / path).read_text()):
            for m in re.finditer(r"(?<![\w`-])--[a-z][a-z-]*", text):
                if re.search(r"(deepfake-[a-z]+|\bevaluate)\b[^;,()]*$", text[:m.start()]):
                    continue  # another command's flag, named with its command: `deepfake-inspect OUT --verify`
                missing += [f"{path}: {m.group()} not a flag of {c}" for c in clis if m.group() not in have[c]]
    assert not missing, missing


# -- more names that are not UTF-8: a checkpoint, an ONNX file, a run dir; stdout that goes away -----------
def test_checkpoint_and_onnx_names_need_not_be_utf8(world, tmp_path, caplog):
    ck = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"ck\xff.safetensors"))
    shutil.copyfile(world["ckpt"]["ok"], ck)
    onnx_path = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"m\xfe.onnx"))
    assert export.main(["--checkpoint", ck, "--onnx", onnx_path]) == 0
    import onnx

    assert {p.key: p.value for p in onnx.load(onnx_path).metadata_props}["checkpoint"] == "ck\\xff.safetensors"
    assert predict.main(["--checkpoint", ck, str(world["real"]), "--workers", "0", "--out", str(tmp_path / "p.csv")]) == 0
    run = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"run\xff"))
    assert train.main(["--data", str(world["packed"]), "--out", run, *TINY]) == 2
    assert "--out " + str(tmp_path) + "/run\\xff: not valid UTF-8 (TensorBoard cannot write there)" in one_error(caplog)
    assert not os.path.exists(run)


def test_predict_stdout_closed_is_one_line(world, tmp_path):
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.predict", "--checkpoint", str(world["ckpt"]["ok"]),
                                 str(world["real"]), str(world["fake"]), "--workers", "0", "--device", "cpu"],
                                stdout=subprocess.PIPE, stderr=err, env=env(), cwd=REPO)
        proc.stdout.close()  # the reader goes away before any row is written (`| head` that ended)
        assert proc.wait(timeout=120) == 2
    text = (tmp_path / "err").read_text()
    assert "Traceback" not in text and "Exception ignored" not in text, text
    assert text.rstrip().endswith("predict: cannot write stdout: the reader closed the pipe; rows were lost: use --out FILE")


@pytest.mark.slow
def test_dali_eval_batch_larger_than_the_split_stays_small(world, tmp_path):
    """An eval batch pads to its full size: --batch-size 100000 on an 18-sample split once made DALI
    decode 100000 images (20 GB, minutes); it is now cut to the split."""
    pytest.importorskip("nvidia.dali")
    proc = run_limited(["pipeline.evaluate", "--checkpoint", str(world["ckpt"]["ok"]), "--data", str(world["packed"]),
                        "--backend", "dali", "--workers", "1", "--device", "cpu", "--batch-size", "100000",
                        "--out", str(tmp_path / "eval")], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 4 * 2**20  # KiB: under 4 GiB
    rows = list(csv.DictReader(open(tmp_path / "eval" / "scores.csv")))
    assert len(rows) == json.loads((world["packed"] / "manifest.json").read_text())["splits"]["val"]["num_samples"]
