import json, pathlib, sys
root = pathlib.Path("runs/exp2")
rows = []
for run in sorted(p for p in root.iterdir() if p.is_dir()):
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    r = {"run": run.name}
    for mode in ("resize", "center", "full", "tiles"):
        f = run / f"eval_{mode}" / "metrics.json"
        if f.exists():
            r[mode] = json.loads(f.read_text())["metrics"]["roc_auc"]
    f = run / "eval_robust" / "robustness.json"
    if f.exists():
        rob = json.loads(f.read_text())
        r["default"] = rob.get("scoring")
        r["clean"] = rob["clean"]["roc_auc"]
        for kind, e in rob["degradations"].items():
            levels = e["levels"]
            r[kind] = sum(l.get("roc_auc") or 0 for l in levels) / len(levels)
            r[kind + "_worst"] = min(l.get("roc_auc") or 0 for l in levels)
    for f in sorted(run.glob("eval_proxy*/metrics.json")):
        for row in json.loads(f.read_text())["sets"]:
            if row["scoring"] == r.get("default", row["scoring"]):
                r[row["set"]] = row["roc_auc"]
    s = run / "summary.json"
    if s.exists():
        r["train_s"] = round(json.loads(s.read_text())["train_time_s"])
    rows.append(r)
keys = ["run", "resize", "center", "full", "tiles", "default", "clean", "jpeg", "jpeg_worst", "downscale", "downscale_worst", "blur", "blur_worst", "s128", "s384", "train_s"]
print("| " + " | ".join(keys) + " |")
print("|" + "---|" * len(keys))
for r in rows:
    print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")
