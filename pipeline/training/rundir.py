"""The run directory of a training run: checks before a run starts, resumable state, metrics.csv.

Files are written atomically and only on the main process.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from pipeline.scoring.metrics import HEADLINE, to_jsonable
from pipeline.scoring.outputs import OutputError, check_apart, check_output_dir, shown, writing
from shard_tools.fsutil import atomic_write_json, atomic_write_text, file_mode, loads_json
from shard_tools.inputs import InputError
from shard_tools.outdir import OutputLock

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", *(f"val_{k}" for k in HEADLINE),
                  "img_s", "data_wait_s", "compute_s", "lr")

STATE_DIR = "state"

RUN_LOCK = ".deepfake-train.lock"

PROGRESS = "progress.json"


class RunError(ValueError):
    """A run directory / setting problem the user must fix; the message names the flag or file."""


def comparable(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings a resumed run must share with the saved one: all but ``resume``, ``out`` (the same
    folder by definition) ``explain_val`` (what TensorBoard shows, not how the model trains), and ``pack`` (`check_pack`), with a
    local ``data`` path compared by its resolved path."""
    out = {k: v for k, v in config.items() if k not in ("resume", "out", "explain_val", "pack")}
    resolve = lambda d: str(Path(d).resolve()) if isinstance(d, str) and Path(d).exists() else d  # noqa: E731
    data = out.get("data")
    out["data"] = [resolve(d) for d in data] if isinstance(data, (list, tuple)) else resolve(data)
    return out


def _inputs(config: Mapping[str, Any]) -> List[tuple]:
    """(flag, local folder) of every data input of a run's settings, for `check_apart`."""
    pairs = []
    for key in ("data", "val_data"):
        values = config.get(key)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if isinstance(value, str) and os.path.isdir(value):
                pairs.append((f"--{key.replace('_', '-')}", value))
    return pairs


def check_run_dir(out: Path, config: Mapping[str, Any], *, resume: bool,
                  defaults: Optional[Mapping[str, Any]] = None) -> None:
    """Refuse to overwrite a run without ``--resume``, or to resume one made with other settings.

    ``defaults``: each setting's default; a setting that a saved config.json lacks (added since the run
    began) matches when it has its default now."""
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: is a file, expected a run directory")
    check_output_dir("--out", out)  # writable, or creatable: before any data is read
    try:
        os.path.abspath(out).encode("utf-8")
    except UnicodeEncodeError:  # tensorboard encodes its file names as UTF-8, strictly
        raise RunError(f"--out {shown(out)}: not valid UTF-8 (TensorBoard cannot write there); choose another --out") from None
    check_apart("--out", out, _inputs(config))
    if not cfg_path.exists():
        if out.exists() and any(p.name != RUN_LOCK for p in out.iterdir()) and not resume:
            raise RunError(f"--out {out}: folder exists and is not empty (no config.json); choose another --out")
        return
    if not resume:
        finished = (out / "summary.json").exists()
        what = "a finished run" if finished else "an unfinished run (pass --resume to continue it)"
        raise RunError(f"--out {out}: already holds {what}; choose another --out")
    try:
        saved = loads_json(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{cfg_path}: cannot read it ({e}); cannot --resume this run") from None
    now, before = comparable(json.loads(json.dumps(config))), comparable(saved)
    known = json.loads(json.dumps(dict(defaults or {})))
    diffs = [f"--{k.replace('_', '-')} {before.get(k)!r} (saved) vs {now.get(k)!r} (now)"
             for k in sorted(set(now) | set(before)) if now.get(k) != before.get(k)
             and not (k not in before and k in known and now.get(k) == known[k])]
    if diffs:
        raise RunError(f"--resume: {cfg_path} was written with other settings: {'; '.join(diffs)}")


def lock_run_dir(out: Path, accelerator) -> Optional[OutputLock]:
    """The main process takes an exclusive lock on the run folder (``RUN/.deepfake-train.lock``, an flock held
    until the run ends, as deepfake-pack locks its output), so two runs never write one folder; when another
    run holds it, every rank raises the same RunError. Returns the held lock (main process) or None."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = OutputLock(out, name=RUN_LOCK, tool="deepfake-train").__enter__()
        except (InputError, OSError) as e:
            error = f"{shown(e)}; wait for it to finish, or choose another --out"
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [error]
        broadcast_object_list(box)
        error = box[0]
    if error:
        if lock is not None:
            lock.__exit__(None, None, None)
        raise RunError(error)
    return lock


def check_pack(out: Path, pack: Mapping[str, Optional[str]], *, resume: bool) -> None:
    """A resumed run reads the pack it started on: RunError naming both fingerprints (`ShardSet.fingerprint`)
    when the run's config.json recorded another one for a split."""
    cfg_path = out / "config.json"
    if not resume or not cfg_path.exists():
        return
    saved = loads_json(cfg_path.read_text()).get("pack")
    if not isinstance(saved, dict):
        logger.warning("warning: %s records no pack fingerprint (written by an older version): --resume cannot "
                       "check that the data is the pack the run started on", cfg_path)
        return
    for split in ("train", "val"):
        before, now = saved.get(split), pack.get(split)
        if before != now:
            raise RunError(f"--resume: {out} began on a {split} split with fingerprint {str(before)[:16]}, the data "
                           f"now gives {str(now)[:16]}: the pack changed (re-packed, or another --data); resuming would "
                           "mix the two packs' samples: start a new run with another --out, or give the pack it began on")


def latest_state(out: Path) -> Optional[Path]:
    """The newest complete ``state/epoch_NNNN`` folder (a complete one has progress.json), or None."""
    root = out / STATE_DIR
    done = sorted(p for p in root.glob("epoch_*") if (p / PROGRESS).exists()) if root.is_dir() else []
    return done[-1] if done else None


def save_training_state(accelerator, out: Path, epoch: int, progress: Mapping[str, Any]) -> Path:
    """``accelerator.save_state`` into a temp folder, then rename: a SIGKILL never leaves a half state.

    A failed write (disk full, a file-size limit) is an OutputError naming the state folder, with the
    temp folder removed; the previous epoch's state stays the one --resume finds.
    """
    root = out / STATE_DIR
    final = root / f"epoch_{epoch:04d}"
    tmp = root / f".tmp-epoch_{epoch:04d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(tmp, "the training state"):
            tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        with writing(final, "the training state"):
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                atomic_write_json(tmp / PROGRESS, to_jsonable(dict(progress)))
                for f in tmp.iterdir():  # safetensors writes 0600 files; torch.save the usual 0666 & ~umask
                    if f.is_file():
                        os.chmod(f, file_mode())
    except OutputError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in root.glob("epoch_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        for old in root.glob(".tmp-*"):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator, state: Path) -> Dict[str, Any]:
    """``accelerator.load_state`` (model, optimizer, scheduler, RNG) and the saved progress.

    Anything unreadable is a RunError naming the state folder: corrupt, or written by another version
    of the code or of torch/accelerate. (Never a fix that unpickles untrusted code.)
    """
    try:
        # accelerate skips an unreadable RNG file with an info line; a resumed run would then silently differ
        from accelerate.utils import load as accelerate_load

        accelerate_load(state / f"random_states_{accelerator.process_index}.pkl")
        accelerator.load_state(str(state))
        progress = json.loads((state / PROGRESS).read_text())
        Progress.from_dict(progress)
    except Exception as e:  # torch, safetensors, accelerate and json raise many types for a damaged file
        raise RunError(f"--resume: the training state {state} is corrupt or incompatible ({type(e).__name__}); "
                       "it cannot be continued: start a new run with another --out") from None
    return progress


def source_columns(names: Sequence[str]) -> List[str]:
    """The per-source validation columns of a run on several sources: ``val_loss/NAME``, ``val_roc_auc/NAME``, ..."""
    return [f"val_{k}/{name}" for name in names for k in ("loss", *HEADLINE)]


def write_metrics_csv(path: Path, rows: Sequence[Mapping[str, Any]], extra: Sequence[str] = ()) -> None:
    """One row per epoch: `METRIC_COLUMNS`, then ``extra`` (`source_columns`)."""
    columns = (*METRIC_COLUMNS, *extra)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


@dataclass
class Progress:
    """What a resumed run needs besides the accelerate state: finished epochs and their results."""

    epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_epoch: Optional[int] = None
    best_score: float = -math.inf
    best_metrics: Dict[str, Any] = field(default_factory=dict)
    train_time_s: float = 0.0

    def as_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history, "best_epoch": self.best_epoch,
                "best_score": self.best_score, "best_metrics": self.best_metrics, "train_time_s": self.train_time_s}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Progress":
        score = d.get("best_score")
        return cls(epoch=int(d["epoch"]), history=list(d.get("history", [])), best_epoch=d.get("best_epoch"),
                   best_score=-math.inf if score is None else float(score),
                   best_metrics=dict(d.get("best_metrics") or {}), train_time_s=float(d.get("train_time_s", 0.0)))


def selection_score(val: Mapping[str, Any]) -> float:
    """Best-epoch criterion: validation ROC AUC, or minus the loss when AUC is undefined (one class)."""
    auc = val.get("roc_auc")
    if auc is not None and not math.isnan(auc):
        return float(auc)
    return -float(val["loss"]) - 10.0
