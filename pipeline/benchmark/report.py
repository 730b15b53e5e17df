"""Ratios, the Markdown table and the bar chart of `pipeline.bench` results."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from shard_tools.fsutil import atomic_savefig


def _by_name(rows: List[dict]) -> Dict[str, dict]:
    return {r["name"]: r for r in rows}


def _rate(rows: Dict[str, dict], name: str) -> Optional[float]:
    r = rows.get(name)
    return r["img_s"] if r and r.get("status") == "ok" and r.get("img_s") else None


def limit_name(row: dict) -> Optional[str]:
    """The work-limit row a loader row is measured against (``limit_train`` for train loaders and the
    memory rows, which run train epochs; ``limit_eval`` for eval loaders), or None for other rows."""
    if row.get("group") == "memory":
        return "limit_train"
    if row.get("group") == "loader":
        return "limit_train" if row.get("train") else "limit_eval"
    return None


def add_ratios(rows: List[dict]) -> dict:
    """Add ``vs_decode`` and ``vs_original`` to every measured row and ``vs_work_limit`` to the loader
    rows; return the run's summary."""
    named = _by_name(rows)
    decode, original = _rate(named, "decode"), _rate(named, "original")
    vs_limit = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        r["vs_decode"] = round(r["img_s"] / decode, 3) if decode else None
        r["vs_original"] = round(r["img_s"] / original, 3) if original else None
        limit = limit_name(r)
        if limit:
            rate = _rate(named, limit)
            r["work_limit"] = limit
            r["vs_work_limit"] = vs_limit[r["name"]] = round(r["img_s"] / rate, 3) if rate else None
    loaders = [r for r in rows if r.get("group") == "loader" and r.get("train") and r.get("status") == "ok"]
    best = max(loaders, key=lambda r: r["img_s"]) if loaders else None
    summary = {
        "decode_img_s": decode, "original_img_s": original,
        "best_train_loader": best["name"] if best else None,
        "best_train_loader_img_s": best["img_s"] if best else None,
        "best_vs_decode": best.get("vs_decode") if best else None,
        "best_vs_original": best.get("vs_original") if best else None,
        "work_limit_train_img_s": _rate(named, "limit_train"), "work_limit_eval_img_s": _rate(named, "limit_eval"),
        "vs_work_limit": vs_limit,
    }
    gpu = _rate(named, "decode_gpu")
    if gpu:
        summary["decode_gpu_img_s"] = gpu
    fed = named.get("stall_fed")
    if fed and fed.get("status") == "ok":
        summary["stall_percent"] = fed["stall_percent"]
        summary["data_wait_percent"] = fed.get("data_wait_percent")
    pack, pack25, dfiles = named.get("pack_100"), named.get("pack_25"), _rate(named, "decode_files")
    if pack and pack.get("status") == "ok":
        summary["pack_img_s"] = pack["img_s"]
        summary["pack_vs_decode_files"] = round(pack["img_s"] / dfiles, 3) if dfiles else None
        summary["pack_peak_pss_mb"] = pack["peak_pss_mb"]
        summary["pack_peak_rss_mb"] = pack["peak_rss_mb"]
        if pack25 and pack25.get("status") == "ok":
            summary["pack_25_peak_pss_mb"] = pack25["peak_pss_mb"]
            summary["pack_pss_growth_100_vs_25"] = round(pack["peak_pss_mb"] / pack25["peak_pss_mb"], 3)
            summary["pack_25_peak_rss_mb"] = pack25["peak_rss_mb"]
            summary["pack_rss_growth_100_vs_25"] = round(pack["peak_rss_mb"] / pack25["peak_rss_mb"], 3)
    return summary


def _fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: List[dict]) -> str:
    """A Markdown table: one line per row, skipped/failed rows with their reason."""
    head = ("| row | img/s | MB/s | × decode-only | × work limit | × original | peak PSS / RSS MB | CPU % | procs "
            "| notes |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {r['status']} | | | | | | | | {r.get('reason', '')} |")
            continue
        lines.append(
            f"| {r['label']} | {_fmt(r['img_s'])} | {_fmt(r.get('mb_s'), ',.1f')} | {_fmt(r.get('vs_decode'), '.2f')} | "
            f"{_fmt(r.get('vs_work_limit'), '.2f')} | {_fmt(r.get('vs_original'), '.2f')} | "
            f"{_fmt(r.get('peak_pss_mb'), ',.0f')} / {_fmt(r.get('peak_rss_mb'), ',.0f')} | "
            f"{_fmt(r.get('cpu_percent'), '.0f')} | {r.get('processes', '')} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def plot(rows: List[dict], path: Path, title: str) -> None:
    """Horizontal bars of img/s (log scale), the decode-only limit as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"io": "#7f7f7f", "limit": "#2ca02c", "baseline": "#d62728", "naive": "#ff7f0e",
              "loader": "#1f77b4", "stall": "#9467bd", "pack": "#8c564b"}
    labels = [r["label"] for r in rows]
    values = [r["img_s"] if r.get("status") == "ok" else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.6))
    ys = list(range(len(rows)))[::-1]
    positive = [v for v in values if v > 0]
    floor = min(positive) / 2 if positive else 1.0
    ax.barh(ys, [v if v > 0 else floor for v in values], color=[colors.get(r.get("group"), "#333") for r in rows],
            alpha=0.9)
    for y, v, r in zip(ys, values, rows):
        text = f" {v:,.0f}" if v > 0 else f" {r.get('status')}: {str(r.get('reason', ''))[:60]}"
        ax.text(v if v > 0 else floor, y, text, va="center", fontsize=8)
    decode = next((r["img_s"] for r in rows if r["name"] == "decode" and r.get("status") == "ok"), None)
    if decode:
        ax.axvline(decode, color="#2ca02c", linestyle="--", linewidth=1, label="decode-only limit")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("images / s (median of repeats, log scale)")
    ax.set_title(title, fontsize=9)
    if positive:
        ax.set_xlim(floor, max(positive) * 4)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=90)
    plt.close(fig)
