"""The off-source table of docs/experiments/offsource.sh: one row per run under runs/off."""
import json
import pathlib

root = pathlib.Path("runs/off")


def hanley_mcneil(auc, n_pos, n_neg):
    """Half-width of the 95% interval of a ROC AUC (Hanley & McNeil, 1982): how far a difference is noise."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return 1.96 * var ** 0.5


def cell(m):
    return f"{m['roc_auc']:.3f} ± {hanley_mcneil(m['roc_auc'], m.get('n_fake', m['n'] // 2), m.get('n_real', m['n'] - m['n'] // 2)):.2f}"


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
    cells.append(cell(dfdc["sets"][0]) if dfdc else "")
    cells.append(cell(ffpp["metrics"]) if ffpp else "")
    cells.append(cell(ffpp["video_metrics"]) if ffpp and "video_metrics" in ffpp else "")
    cells.append(str(round(summary["train_time_s"])) if summary else "")
    print("| " + " | ".join(cells) + " |")
