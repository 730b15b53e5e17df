"""One line per figure of a `.ci/gpu_check` run: every bench row (img/s, stall, ratio to its work
limit) and every training epoch (img/s, data wait vs compute); written to OUT/summary.txt."""
import csv
import json
import sys
from pathlib import Path


def main(out: Path) -> int:
    lines = []
    try:
        bench = json.loads((out / "bench.json").read_text())
        for r in bench["rows"]:
            fig = f"{r['img_s']:,.0f} img/s" if r.get("status") == "ok" else f"{r['status']}: {r.get('reason', '')}"
            if r.get("stall_percent") is not None:
                fig += f", stall {r['stall_percent']}% (data wait {r.get('data_wait_percent')}%)"
            if r.get("vs_work_limit"):
                fig += f", {r['vs_work_limit']}x its work limit ({r['work_limit']})"
            lines.append(f"bench {r['name']}: {fig}")
    except (OSError, ValueError, KeyError) as exn:
        lines.append(f"bench: no result ({type(exn).__name__}: {exn})")
    try:
        with open(out / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                lines.append(f"train epoch {row['epoch']}: {float(row['img_s']):,.0f} img/s, "
                             f"data wait {row['data_wait_s']} s, compute {row['compute_s']} s")
    except (OSError, ValueError, KeyError) as exn:
        lines.append(f"train: no result ({type(exn).__name__}: {exn})")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
