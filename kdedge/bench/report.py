"""Benchmark reports: ``report.json`` (the data), ``report.md`` (tables), ``plots/``, ``report.html`` (both in one
self-contained page) and comparisons."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdedge._fs import Claim, claimed, publish_dir
from kdedge.errors import ConfigError

__all__ = ["REPORT_SCHEMA", "write_report", "write_report_files", "render_markdown", "render_html", "load_report", "compare_reports", "render_comparison",
           "pareto_front", "write_plots", "write_frontier", "frontier_target"]

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


def _tables(report: dict[str, Any]) -> list[tuple[str | None, list[str], list[list[str]]]]:
    """The report's tables as ``(section title or None, header, rows)``: what report.md and report.html both render."""
    rows = report["rows"]
    tables: list[tuple[str | None, list[str], list[list[str]]]] = []
    seen, sizes = set(), []
    for r in rows:
        key = (r["model"], r["variant"], r["target"])
        if key in seen:
            continue
        seen.add(key)
        acc = r.get("accuracy") or {}
        sizes.append([r["model"], r["role"], r["variant"], r["target"], f"{acc.get('top1', float('nan')):.4f}", f"{acc.get('macro_f1', float('nan')):.4f}",
                      "unknown" if r["params"] is None else format(r["params"], ","),
                      "unknown" if r["flops"] is None else format(r["flops"] / 1e6, ".2f") + " M", _fmt_bytes(r["bytes"]),
                      _fmt_bytes(r["memory"]["peak_rss_bytes"])])
    tables.append(("Accuracy and size (measured through each runner)",
                   ["model", "role", "variant", "target", "top-1", "macro F1", "params", "FLOPs/sample", "bytes", "peak RSS"], sizes))
    latency = []
    for r in rows:
        lat = r["latency_ms"]
        latency.append([r["model"], r["variant"], r["target"], str(r["batch"]), f"{lat['p50_ms']:.4f}", f"{lat['p90_ms']:.4f}", f"{lat['p99_ms']:.4f}",
                        f"{lat['mean_ms']:.4f} ± {lat['std_ms']:.4f}", f"{lat.get('drift', 0.0):.0%}", f"{r['throughput_per_s']:,.0f}"])
    tables.append(("Latency and throughput", ["model", "variant", "target", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "drift", "samples/s"],
                   latency))
    if any("multi_stream" in r for r in rows):
        tables.append((None, ["model", "variant", "target", "batch", "streams", "samples/s under load"],
                       [[r["model"], r["variant"], r["target"], str(r["batch"]), str(r["multi_stream"]["streams"]),
                         f"{r['multi_stream']['throughput_per_s']:,.0f}"] for r in rows if "multi_stream" in r]))
    comp = report.get("comparison") or []
    if comp:
        tables.append(("Teacher vs student", ["student variant @ target", "vs teacher variant @ target", "batch", "latency speedup (p50)",
                                              "throughput speedup", "params ÷", "FLOPs ÷", "bytes ÷", "Δ accuracy (pt)", "retention"],
                       [[f"{c['student_variant']} @ {c['student_target']}", f"{c['teacher_variant']} @ {c['teacher_target']}", str(c["batch"]),
                         f"{c['latency_speedup']:.1f}×", f"{c['throughput_speedup']:.1f}×", _ratio(c, "params_ratio"), _ratio(c, "flops_ratio"),
                         _ratio(c, "bytes_ratio"), f"{c.get('accuracy_delta_pt', float('nan')):+.2f}", f"{c.get('accuracy_retention', float('nan')):.4f}"]
                        for c in comp]))
    decision = report.get("decision")
    if decision:
        us = lambda ms: f"{1000 * ms:.1f}"  # noqa: E731
        rows_ = [[r["contender"], r["precision"], r["architecture"], f"{100 * r['val_accuracy']:.2f}" if "val_accuracy" in r else "-",
                  us(r["p50_ms"]) if "p50_ms" in r else "-", "–".join(us(v) for v in r["p50_range_ms"]) if "p50_range_ms" in r else "-",
                  r["verdict"]] for r in decision["rows"] + decision["teacher"]]
        rows_ += [[name, "-", "-", "-", "-", "-", f"not built: {why}"] for name, why in decision.get("not_built", {}).items()]
        tables.append((f"Decision: every contender on {decision['target']} at {decision['threads']} thread(s), batch 1, budget {us(decision['budget_ms'])} µs "
                       "(validation accuracy in the target's runtime; all timed interleaved in one run)",
                       ["contender", "precision", "architecture", "val top-1 %", "p50 µs", "p10–p90 µs", "verdict"], rows_))
    return tables


def _numeric(header: str) -> bool:
    return header not in ("model", "role", "variant", "target", "student variant @ target", "vs teacher variant @ target", "contender", "precision",
                          "architecture", "verdict")


def _timing_line(report: dict[str, Any]) -> str:
    cfg = report["config"]
    return (f"Timing: warm-up {cfg['warmup_iters']} calls and {cfg['warmup_s']} s, then single calls until {cfg['min_iters']} samples and {cfg['min_s']} s; "
            "CPU and onnxruntime by the host clock around each call, CUDA by CUDA events.")


def render_markdown(report: dict[str, Any]) -> str:
    """The report's tables: accuracy and size per variant, latency per batch, teacher vs student."""
    out = [f"# kdedge benchmark ({report['created']})", "", f"Data: {report['data']['name']}, {report['data']['test_samples']} test images.", ""]
    out += _env_lines(report["env"]) + [""]
    out.append(_timing_line(report))
    for title, header, rows in _tables(report):
        out += ["", f"## {title}", ""] if title else [""]
        out += ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if _numeric(h) else "---" for h in header) + "|"]
        out += ["| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |" for row in rows]  # a reason may hold either
    return "\n".join(out) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px}"
        "th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}"
        "figure{margin:0 0 1.5em}figcaption{font-size:13px;color:#555}")


def render_html(report: dict[str, Any], plots: Sequence[Path] = (), *, title: str = "kdedge benchmark") -> str:
    """report.md's content as one self-contained page: the tables, and ``plots`` embedded as data URIs (no file or network fetch)."""
    import base64
    import html

    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)} ({e(report['created'])})</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)} ({e(report['created'])})</h1>",
           f"<p>Data: {e(str(report['data']['name']))}, {report['data']['test_samples']} test images.</p>",
           "<ul>" + "".join(f"<li>{e(line.removeprefix('- '))}</li>" for line in _env_lines(report["env"])) + "</ul>", f"<p>{e(_timing_line(report))}</p>"]
    for path in plots:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(Path(path).stem)}"><figcaption>{e(Path(path).name)}</figcaption></figure>')
    for section, header, rows in _tables(report):
        if section:
            out.append(f"<h2>{e(section)}</h2>")
        cls = ["n" if _numeric(h) else "" for h in header]
        out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
        out += ["<tr>" + "".join(f'<td class="{c}">{e(v)}</td>' if c else f"<td>{e(v)}</td>" for c, v in zip(cls, row)) + "</tr>" for row in rows]
        out.append("</tbody></table>")
    out.append("</body></html>")
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


def frontier_target(report: dict[str, Any]) -> str | None:
    """The target of the report's fastest student row at its smallest batch (the one a deployment would pick), or None."""
    students = [r for r in report["rows"] if r["role"] != "teacher" and r.get("accuracy")]
    if not students:
        return None
    smallest = min(r["batch"] for r in students)
    return min((r for r in students if r["batch"] == smallest), key=lambda r: r["latency_ms"]["p50_ms"])["target"]


def write_frontier(report: dict[str, Any], out_dir: Path, *, target: str | None = None, budget_ms: float | None = None) -> Path | None:
    """``frontier.png``: test accuracy vs p50 at the smallest batch on one ``target`` (default :func:`frontier_target`), every
    model and variant timed there, the teacher as squares, the Pareto front, and ``budget_ms`` as a vertical line. None when
    no row on that target has an accuracy. A report with a ``decision`` (a bundle's ``--latency-budget``) plots that
    measurement instead: every contender and the teacher on the decision's target, validation accuracy in its runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    decision = report.get("decision")
    if decision:  # the decision's own measurement: every contender and the teacher, timed interleaved, accuracy in the runtime
        points = [(r["p50_ms"], 100 * r["val_accuracy"], f"{r['contender']} {r['precision']}" + (" (shipped)" if r["verdict"] == "shipped" else ""),
                   r["contender"] == "teacher") for r in decision["rows"] + decision["teacher"] if "p50_ms" in r and "val_accuracy" in r]
        target, smallest, budget_ms, split = decision["target"], 1, decision["budget_ms"], "validation"
    else:
        target = target or frontier_target(report)
        rows = [r for r in report["rows"] if r["target"] == target and r.get("accuracy")]
        smallest = min((r["batch"] for r in rows), default=1)
        points = [(r["latency_ms"]["p50_ms"], 100 * r["accuracy"]["top1"], f"{r['model']} {r['variant']}" + (" (teacher)" if r["role"] == "teacher" else ""),
                   r["role"] == "teacher") for r in rows if r["batch"] == smallest]
        split = "test"
    if not points:
        return None
    xy = [(x, y) for x, y, _label, _teacher in points]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for x, y, label, teacher in points:
        ax.scatter(x, y, s=50, marker="s" if teacher else "o", color="tab:red" if teacher else "tab:blue", zorder=3)
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto_front(xy)
    ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "--", color="tab:green", label="Pareto front")
    if budget_ms is not None:
        ax.axvline(budget_ms, color="tab:orange", linestyle=":", label=f"latency budget {budget_ms:g} ms")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of a short log range overlap
    ax.set_xlabel(f"p50 latency on {target} at batch {smallest} (ms, log scale)")
    ax.set_ylabel(f"{split} top-1 accuracy (%)" + (" in the target's runtime" if decision else ""))
    ax.set_title(f"Accuracy vs latency on {target}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "frontier.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out: str | Path | Claim | None, *, plots: bool = True) -> Path:
    """Write ``report.json``, ``report.md``, ``plots/`` and ``report.html`` into a new directory ``out`` (atomically; None: ``runs/bench-<time>``)."""
    with claimed(out, "bench") as claim, publish_dir(claim.path) as tmp:
        write_report_files(report, tmp, plots=plots)
    return claim.path


def write_report_files(report: dict[str, Any], directory: Path, *, plots: bool = True, frontier: bool = False, target: str | None = None,
                       budget_ms: float | None = None, title: str = "kdedge benchmark") -> list[Path]:
    """``report.json``, ``report.md``, ``plots/*.png`` and ``report.html`` (the tables and plots in one self-contained page)
    inside an existing ``directory``; with ``frontier``, ``plots/frontier.png`` too (:func:`write_frontier`)."""
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (directory / "report.md").write_text(render_markdown(report), encoding="utf-8")
    written = [directory / "report.json", directory / "report.md"]
    images: list[Path] = []
    if plots:
        if frontier and (path := write_frontier(report, directory / "plots", target=target, budget_ms=budget_ms)) is not None:
            images.append(path)
        images += write_plots(report, directory / "plots")
    (directory / "report.html").write_text(render_html(report, images, title=title), encoding="utf-8")
    return written + images + [directory / "report.html"]


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
