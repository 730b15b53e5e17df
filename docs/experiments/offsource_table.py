"""The off-source table of docs/experiments/offsource.sh: one row per run under runs/off."""
import json
import pathlib

root = pathlib.Path("runs/off")


def load(path):
    return json.loads(path.read_text()) if path.exists() else None


print("| run | val AUC | robustness mean AUC (jpeg / downscale / blur) | dfdc-dev AUC | ffpp-dev frame AUC | ffpp-dev video AUC | train s |")
print("|---|---|---|---|---|---|---|")
for run in sorted(p for p in root.iterdir() if p.is_dir()):
    val, dfdc, ffpp = (load(run / f / "metrics.json") for f in ("eval_val", "eval_dfdc", "eval_ffpp"))
    rob = load(run / "eval_val" / "robustness.json")
    summary = load(run / "summary.json")
    cells = [run.name, f"{val['metrics']['roc_auc']:.3f}" if val else ""]
    if rob:
        means = [sum(l.get("roc_auc") or 0 for l in e["levels"]) / len(e["levels"]) for e in rob["degradations"].values()]
        cells.append(" / ".join(f"{m:.3f}" for m in means))
    else:
        cells.append("")
    cells.append(f"{dfdc['sets'][0]['roc_auc']:.3f}" if dfdc else "")
    cells.append(f"{ffpp['metrics']['roc_auc']:.3f}" if ffpp else "")
    cells.append(f"{ffpp['video_metrics']['roc_auc']:.3f}" if ffpp and "video_metrics" in ffpp else "")
    cells.append(str(round(summary["train_time_s"])) if summary else "")
    print("| " + " | ".join(cells) + " |")
