"""Benchmark reports: ``report.json`` (the data), ``report.md`` (tables), ``plots/`` and comparisons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdedge._fs import Claim, claimed, publish_dir
from kdedge.errors import ConfigError

__all__ = ["REPORT_SCHEMA", "write_report", "write_report_files", "render_markdown", "load_report", "compare_reports", "render_comparison", "pareto_front", "write_plots"]

#: Version of ``report.json``'s layout; :func:`load_report` refuses others.
REPORT_SCHEMA = 1


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "—"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _env_lines(env: dict[str, Any]) -> list[str]:
    cpu = env.get("cpu", {})
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    lines = [
        f"- CPU: {cpu.get('model', '?')} ({cpu.get('usable_cores', cpu.get('logical_cores'))} usable cores; flags: {' '.join(cpu.get('flags', [])) or '—'})",
        f"- threads: requested {env.get('threads', {}).get('requested') or 'default'}, torch {env.get('threads', {}).get('torch')}",
        f"- versions: {versions}",
        f"- GPU: {env['gpu']['name']} (sm {env['gpu']['compute_capability']}, CUDA {env['gpu']['cuda']})" if env.get("gpu") else "- GPU: none",
    ]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The report's tables: accuracy and size per variant, latency per batch, teacher vs student."""
    rows = report["rows"]
    out = [f"# kdedge benchmark ({report['created']})", "", f"Data: {report['data']['name']}, {report['data']['test_samples']} test images.", ""]
    out += _env_lines(report["env"]) + [""]
    cfg = report["config"]
    out.append(f"Timing: warm-up {cfg['warmup_iters']} calls and {cfg['warmup_s']} s, then single calls until {cfg['min_iters']} samples and {cfg['min_s']} s; "
               "CPU and onnxruntime by the host clock around each call, CUDA by CUDA events.")
    out += ["", "## Accuracy and size (measured through each runner)", "",
            "| model | role | variant | target | top-1 | macro F1 | params | FLOPs/sample | bytes | peak RSS |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    seen = set()
    for r in rows:
        key = (r["model"], r["variant"], r["target"])
        if key in seen:
            continue
        seen.add(key)
        acc = r.get("accuracy") or {}
        out.append(f"| {r['model']} | {r['role']} | {r['variant']} | {r['target']} | {acc.get('top1', float('nan')):.4f} | {acc.get('macro_f1', float('nan')):.4f} | "
                   f"{'unknown' if r['params'] is None else format(r['params'], ',')} | "
                   f"{'unknown' if r['flops'] is None else format(r['flops'] / 1e6, '.2f') + ' M'} | {_fmt_bytes(r['bytes'])} | {_fmt_bytes(r['memory']['peak_rss_bytes'])} |")
    out += ["", "## Latency and throughput", "", "| model | variant | target | batch | p50 ms | p90 ms | p99 ms | mean ± std ms | drift | samples/s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lat = r["latency_ms"]
        out.append(f"| {r['model']} | {r['variant']} | {r['target']} | {r['batch']} | {lat['p50_ms']:.4f} | {lat['p90_ms']:.4f} | {lat['p99_ms']:.4f} | "
                   f"{lat['mean_ms']:.4f} ± {lat['std_ms']:.4f} | {lat.get('drift', 0.0):.0%} | {r['throughput_per_s']:,.0f} |")
    if any("multi_stream" in r for r in rows):
        out += ["", "| model | variant | target | batch | streams | samples/s under load |", "|---|---|---|---:|---:|---:|"]
        for r in rows:
            if "multi_stream" in r:
                ms = r["multi_stream"]
                out.append(f"| {r['model']} | {r['variant']} | {r['target']} | {r['batch']} | {ms['streams']} | {ms['throughput_per_s']:,.0f} |")
    comp = report.get("comparison") or []
    if comp:
        out += ["", "## Teacher vs student", "",
                "| student variant @ target | vs teacher variant @ target | batch | latency speedup (p50) | throughput speedup | params ÷ | FLOPs ÷ | bytes ÷ | Δ accuracy (pt) | retention |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in comp:
            out.append(f"| {c['student_variant']} @ {c['student_target']} | {c['teacher_variant']} @ {c['teacher_target']} | {c['batch']} | "
                       f"{c['latency_speedup']:.1f}× | {c['throughput_speedup']:.1f}× | {_ratio(c, 'params_ratio')} | {_ratio(c, 'flops_ratio')} | "
                       f"{_ratio(c, 'bytes_ratio')} | {c.get('accuracy_delta_pt', float('nan')):+.2f} | {c.get('accuracy_retention', float('nan')):.4f} |")
    return "\n".join(out) + "\n"


def _ratio(c: dict, key: str) -> str:
    return f"{c[key]:.1f}×" if c.get(key) else "—"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (lower latency, higher accuracy), sorted by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """accuracy_vs_latency.png (batch 1, Pareto front marked) and throughput_vs_batch.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report["rows"]
    written = []
    smallest = min(r["batch"] for r in rows)
    pts = [r for r in rows if r["batch"] == smallest and r.get("accuracy")]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        xy = [(r["latency_ms"]["p50_ms"], 100 * r["accuracy"]["top1"]) for r in pts]
        for r, (x, y) in zip(pts, xy):
            ax.scatter(x, y, s=40, marker="o" if r["role"] != "teacher" else "s", color="tab:red" if r["role"] == "teacher" else "tab:blue")
            ax.annotate(f"{r['model']} {r['variant']} @ {r['target']}", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front = pareto_front(xy)
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "--", color="tab:green", label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(f"p50 latency at batch {smallest} (ms, log scale)")
        ax.set_ylabel("test top-1 accuracy (%)")
        ax.set_title("Accuracy vs latency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "accuracy_vs_latency.png")
        fig.savefig(written[-1])
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    series: dict[tuple, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault((r["model"], r["variant"], r["target"]), []).append((r["batch"], r["throughput_per_s"]))
    for (model, variant, target), pts_ in series.items():
        pts_.sort()
        ax.plot([p[0] for p in pts_], [p[1] for p in pts_], marker="o", label=f"{model} {variant} @ {target}")
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("throughput (samples/s, at p50 latency)")
    ax.set_title("Throughput vs batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / "throughput_vs_batch.png")
    fig.savefig(written[-1])
    plt.close(fig)
    return written


def write_report(report: dict[str, Any], out: str | Path | Claim | None, *, plots: bool = True) -> Path:
    """Write ``report.json``, ``report.md`` and ``plots/`` into a new directory ``out`` (atomically; None: ``runs/bench-<time>``)."""
    with claimed(out, "bench") as claim, publish_dir(claim.path) as tmp:
        write_report_files(report, tmp, plots=plots)
    return claim.path


def write_report_files(report: dict[str, Any], directory: Path, *, plots: bool = True) -> list[Path]:
    """``report.json``, ``report.md`` and ``plots/*.png`` inside an existing ``directory``."""
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "report.md").write_text(render_markdown(report))
    written = [directory / "report.json", directory / "report.md"]
    if plots:
        written += write_plots(report, directory / "plots")
    return written


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such report; expected a report.json written by kdedge bench") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON report ({exc})") from None
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA or not isinstance(report.get("rows"), list):
        raise ConfigError(f"{path}: expected a kdedge report with schema {REPORT_SCHEMA} and rows, found schema {report.get('schema') if isinstance(report, dict) else None}")
    return report


def _noise(row: dict) -> float:
    """A row's measured noise: the larger of its spread (p90 − p50)/p50 and its drift during the run."""
    lat = row["latency_ms"]
    return max(0.0, (lat["p90_ms"] - lat["p50_ms"]) / lat["p50_ms"], lat.get("drift", 0.0))


def compare_reports(a: dict[str, Any], b: dict[str, Any], *, min_change: float = 0.05) -> list[dict[str, Any]]:
    """B relative to A for every row present in both (matched on model, variant, target, batch).

    A latency change is flagged when |B/A − 1| exceeds the larger of ``min_change`` and either
    row's measured noise — its spread (p90 − p50)/p50 or its drift within the run (see
    :class:`~kdedge.bench.timing.LatencyStats`); an accuracy change when top-1 moved by more than 0.1 pt.
    """
    def key(r: dict) -> tuple:
        return (r["model"], r["variant"], r["target"], r["batch"])

    a_rows = {key(r): r for r in a["rows"]}
    out = []
    for r in b["rows"]:
        base = a_rows.get(key(r))
        if base is None:
            continue
        ratio = r["latency_ms"]["p50_ms"] / base["latency_ms"]["p50_ms"]
        threshold = max(min_change, _noise(base), _noise(r))
        flag = "slower" if ratio > 1 + threshold else ("faster" if ratio < 1 / (1 + threshold) else "")
        acc_delta = None
        if base.get("accuracy") and r.get("accuracy"):
            acc_delta = 100 * (r["accuracy"]["top1"] - base["accuracy"]["top1"])
            if abs(acc_delta) > 0.1:
                flag = (flag + ", " if flag else "") + "accuracy changed"
        out.append({"model": r["model"], "variant": r["variant"], "target": r["target"], "batch": r["batch"],
                    "p50_a_ms": base["latency_ms"]["p50_ms"], "p50_b_ms": r["latency_ms"]["p50_ms"], "latency_ratio": ratio,
                    "throughput_ratio": r["throughput_per_s"] / base["throughput_per_s"], "noise_threshold": threshold,
                    "accuracy_delta_pt": acc_delta, "flag": flag})
    return out


def render_comparison(diffs: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<12} {'variant':<11} {'target':<10} {'batch':>5} {'p50 A ms':>10} {'p50 B ms':>10} {'B/A':>6} {'noise':>6}  flag"]
    for d in diffs:
        lines.append(f"{d['model']:<12} {d['variant']:<11} {d['target']:<10} {d['batch']:>5} {d['p50_a_ms']:>10.4f} {d['p50_b_ms']:>10.4f} "
                     f"{d['latency_ratio']:>6.2f} {d['noise_threshold']:>5.0%}  {d['flag'] or '-'}")
    if not diffs:
        lines.append("(no rows in common)")
    return "\n".join(lines)
