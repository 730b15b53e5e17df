"""The one-command demo runs every stage end to end (reduced mode), and the README stays true."""
from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# README command -> module with get_args_parser()
TOOLS = {
    "shard_tools/pack.py": "shard_tools.pack", "deepfake-pack": "shard_tools.pack",
    "shard_tools/inspect.py": "shard_tools.inspect", "deepfake-inspect": "shard_tools.inspect",
    "pipeline/train.py": "pipeline.train", "deepfake-train": "pipeline.train",
    "pipeline/evaluate.py": "pipeline.evaluate", "deepfake-evaluate": "pipeline.evaluate",
    "pipeline/predict.py": "pipeline.predict", "deepfake-predict": "pipeline.predict",
    "pipeline/export.py": "pipeline.export", "deepfake-export": "pipeline.export",
    "pipeline/bench.py": "pipeline.bench", "deepfake-bench": "pipeline.bench",
    "pipeline/demo.py": "pipeline.demo", "deepfake-demo": "pipeline.demo", "pipeline.demo": "pipeline.demo",
}


def test_demo_quick_runs_every_stage(tmp_path):
    from pipeline import demo

    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--quick"]) == 0
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] + manifest["splits"]["val"]["num_samples"] == 80
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["n"] == manifest["splits"]["val"]["num_samples"]
    assert 0.0 <= metrics["roc_auc"] <= 1.0
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("path,p_fake,label") and len(rows) == 7
    bench = json.loads((out / "bench.json").read_text())
    assert {r["name"] for r in bench["rows"]} >= {"read", "decode"}
    for png in ("contact_sheet.png", "run/curves.png", "eval/roc.png", "bench.png"):
        assert (out / png).stat().st_size > 1000, png


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no bash blocks"
    for block in blocks:
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split(" #")[0].strip()
            if cmd and not cmd.startswith("#"):
                yield cmd


def test_readme_commands_use_real_flags():
    """Every flag that a README command passes to one of our tools exists in that tool's parser."""
    checked = 0
    for cmd in _readme_commands():
        words = shlex.split(cmd)
        hits = [i for i, w in enumerate(words) if w in TOOLS or w.endswith(tuple(k for k in TOOLS if "/" in k))]
        if not hits:
            continue
        i = hits[0]
        key = next(k for k in TOOLS if words[i] == k or words[i].endswith(k))
        parser = importlib.import_module(TOOLS[key]).get_args_parser()
        known = set(parser._option_string_actions)
        for w in words[i + 1:]:
            if w.startswith("--"):
                assert w.split("=")[0] in known, f"README: {cmd!r} uses {w}, unknown to {key}"
        checked += 1
    assert checked >= 8, f"only {checked} README commands name a tool"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(line.strip() for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert test_cmd in (ROOT / "README.md").read_text()
