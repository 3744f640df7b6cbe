"""``search.json``: what a search has measured, rewritten atomically after every step, and what is derived from it.

The summary (one latency scale, the Pareto front, the zoo's dominance, the proxy's rank
correlation) and the accuracy-vs-latency plot read only the record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdedge._fs import atomic_file
from kdedge.bench.report import pareto_front

__all__ = ["SearchRecord", "plot", "spearman", "summarize"]


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs or a constant side."""
    if len(a) < 3 or len(a) != len(b):
        return None

    def ranks(v: list[float]) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in set(v):  # ties share their average rank
            idx = [i for i, x in enumerate(v) if x == value]
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


class SearchRecord:
    """``search.json``: candidates, finalists and the winner, rewritten atomically after every step."""

    def __init__(self, path: Path, header: dict[str, Any], saved: dict[str, Any] | None) -> None:
        self.path = path
        self.data: dict[str, Any] = saved or (header | {"candidates": {}, "finalists": {}, "winner": None})
        self.data.update({k: v for k, v in header.items() if k in ("env", "kdedge_version")})
        self.prior_s = float(self.data.get("seconds", 0.0))  # spent before a resume
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds this search has run, resumed runs included."""
        return self.prior_s + time.perf_counter() - self.t0

    @property
    def candidates(self) -> dict[str, dict[str, Any]]:
        return self.data["candidates"]

    def save(self) -> None:
        self.data["seconds"] = self.elapsed()
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=1))


def summarize(record: SearchRecord, winner: str, budget: float) -> None:
    # One scale for every latency: each ratio to the anchor times the anchor's median over the whole run (decisions taken
    # along the way used the median so far; the record shows the final scale).
    anchor = record.data["anchor"]["p50_ms"]
    for entry in [*record.candidates.values(), record.data["teacher"]]:
        if entry.get("vs_anchor") is not None:
            entry["p50_ms"], entry["p90_ms"] = entry["vs_anchor"] * anchor, entry["vs_anchor_p90"] * anchor
    cands = record.candidates
    ranked = [n for n in cands if "proxy_val_accuracy" in cands[n]]
    front = pareto_front([(cands[n]["p50_ms"], cands[n]["proxy_val_accuracy"]) for n in ranked])
    for i, n in enumerate(ranked):
        cands[n]["pareto"] = i in front
    fin = record.data["finalists"]
    names = [n for n in fin if fin[n]["val_accuracy"] is not None]
    rho = spearman([fin[n]["proxy_val_accuracy"] for n in names], [fin[n]["val_accuracy"] for n in names])
    # The zoo vs the searched students, on the proxy: for each zoo student, a searched one at least as accurate and no slower.
    searched = [n for n in ranked if cands[n]["origin"] != "zoo"]
    dominance = {}
    for z in (n for n in ranked if cands[n]["origin"] == "zoo"):
        better = [s for s in searched if cands[s]["p50_ms"] <= cands[z]["p50_ms"] and cands[s]["proxy_val_accuracy"] >= cands[z]["proxy_val_accuracy"]]
        dominance[z] = max(better, key=lambda s: cands[s]["proxy_val_accuracy"]) if better else None
    retimed = record.data.get("head_to_head", {}).get("models", {}).get(winner)  # the pick's p50 re-timed head to head, when it was
    p50 = retimed["p50_ms"] if retimed else cands[winner]["p50_ms"]
    record.data.update({
        "winner": winner,
        "winner_p50_ms": p50,
        "within_budget": p50 <= budget,
        "proxy_rank_correlation": {"spearman": rho, "n": len(names), "over": "finalists (proxy val accuracy vs full-recipe val accuracy)"},
        "zoo_dominated_by": dominance,
    })


def plot(record: SearchRecord, path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    cands = record.candidates
    us = 1000.0  # plotted in microseconds: the students live at tens of them
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    ranked = [n for n in cands if "proxy_val_accuracy" in cands[n]]
    for origin, color, marker in (("searched", "tab:blue", "o"), ("evolved", "tab:cyan", "o"), ("zoo", "tab:orange", "D")):
        pts = [n for n in ranked if cands[n]["origin"] == origin]
        ax.scatter([us * cands[n]["p50_ms"] for n in pts], [100 * cands[n]["proxy_val_accuracy"] for n in pts], s=36 if origin == "zoo" else 18,
                   color=color, marker=marker, alpha=0.8, label=f"{origin} (proxy, val)")
    for n in (n for n in ranked if cands[n]["origin"] == "zoo"):
        ax.annotate(n, (us * cands[n]["p50_ms"], 100 * cands[n]["proxy_val_accuracy"]), fontsize=6, xytext=(3, -8), textcoords="offset points")
    front = sorted((n for n in ranked if cands[n].get("pareto")), key=lambda n: us * cands[n]["p50_ms"])
    ax.plot([us * cands[n]["p50_ms"] for n in front], [100 * cands[n]["proxy_val_accuracy"] for n in front], "--", color="tab:green", label="Pareto front (proxy)")
    fin = {n: f for n, f in record.data["finalists"].items() if f["val_accuracy"] is not None}
    ax.scatter([us * cands[n]["p50_ms"] for n in fin], [100 * fin[n]["val_accuracy"] for n in fin], marker="*", s=90, color="tab:purple",
               label="finalists (full recipe, val)")
    t = record.data.get("teacher")
    if t and t["p50_ms"] is not None:
        ax.scatter([us * t["p50_ms"]], [100 * t["val_accuracy"]], marker="s", s=50, color="tab:red", label=f"teacher ({t['name']}, val)")
    ax.axvline(us * budget, color="grey", linestyle=":", label=f"budget {us * budget:.4g} µs")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=6)
    target = record.data["target"]
    ax.set_xlabel(f"p50 latency on {target['name']} {target.get('precision', 'fp32')}, {target['threads']} thread(s), batch {target['batch']} (µs, log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"kdedge search: accuracy vs measured latency (winner {record.data['winner']})", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
