"""``kdedge search``: the most accurate student that meets a latency budget measured on the target.

    sample candidates ──► export + time on the target (cached) ──► drop over budget
        ──► proxy: short distillation on cached teacher logits, scored on validation
        ──► finalists: the full recipe ──► the best on validation is DIR/student

Everything the search learns is written to ``DIR/search.json`` as it goes, so ``--resume``
continues a killed search where it stopped (latencies come back from the cache, proxy scores
and finished finalists from ``search.json``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdedge._fs import atomic_file
from kdedge._version import __version__
from kdedge.bench.env import capture_environment
from kdedge.bench.report import pareto_front
from kdedge.config import DistillConfig, SearchConfig
from kdedge.data.normalization import Normalization
from kdedge.data.sources import hold_out
from kdedge.data.spec import DataSplits
from kdedge.distill.factory import make_loss
from kdedge.distill.loop import fit, resolve_device
from kdedge.distill.teacher import FrozenTeacher, teacher_input_map
from kdedge.errors import ConfigError, ExportError, TrainingDiverged
from kdedge.metrics import evaluate
from kdedge.models import ModelSpec, count_flops, count_parameters, create_model, load_checkpoint
from kdedge.models.genome import parse_genome
from kdedge.models.zoo import MODELS, TEACHERS
from kdedge.runs import RunResult, distill
from kdedge.search.latency import ANCHOR, LatencyCache, LatencyMeter
from kdedge.search.space import mutate, sample_genomes

__all__ = ["ZOO_STUDENTS", "SearchResult", "run_search", "search", "spearman"]

SEARCH_FORMAT = 1
#: Settings a resumed search may change: they decide how long it runs and where, not what it measures.
_RESUMABLE = frozenset({"time_budget", "finalists", "generations", "out", "resume", "device", "workers", "threads", "latency_cache", "progress"})
#: The hand-made students every search also measures, for comparison (and as candidates).
ZOO_STUDENTS = ("tiny_cnn", "tiny_cnn@0.5", "dw_cnn", "dw_cnn@0.5", "mlp", "mlp@0.5")


@dataclass
class SearchResult:
    """What :func:`search` found.

    Attributes:
        out: The search directory.
        winner: The chosen student's architecture name (``net:...`` or a zoo name).
        student: Its full-recipe run (``out/student``).
        record: The contents of ``search.json``.
    """

    out: Path
    winner: str
    student: RunResult | None
    record: dict[str, Any]


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


class _Record:
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


def _spec(name: str, data: DataSplits) -> ModelSpec:
    from kdedge.models.zoo import parse_model_name

    arch, width = parse_model_name(name)
    return ModelSpec(arch, width, data.spec.num_classes, tuple(data.spec.input_shape))  # type: ignore[arg-type]


def _candidate_names(config: SearchConfig, data: DataSplits) -> list[tuple[str, str]]:
    """(name, origin) for every candidate: sampled genomes, then the zoo's students (searched first)."""
    names = [(str(g), "searched") for g in sample_genomes(config.candidates, tuple(data.spec.input_shape), seed=config.seed)]  # type: ignore[arg-type]
    if config.include_zoo:
        zoo = [n for n in ZOO_STUDENTS if n.partition("@")[0] in MODELS.keys() - TEACHERS]
        names += [(n, "zoo") for n in zoo]
    return names


def _describe(name: str, spec: ModelSpec) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(spec)
    return {"params": count_parameters(model), "flops": count_flops(model, spec.input_shape)}


def search(
    teacher: nn.Module,
    data: DataSplits,
    *,
    config: SearchConfig,
    out: str | Path,
    teacher_name: str | None = None,
    teacher_input: Normalization | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """Find the most accurate student within ``config.latency_budget`` ms on ``config.target``.

    Args:
        teacher: A trained classifier for ``data``'s classes (frozen here).
        data: The splits; without a validation split, ``config.val_split`` (default 0.1) of the
            training images is held out: candidates are ranked and the winner chosen on it, and
            the test split is read only for the finalists' final report.
        config: Budget, target, search and proxy sizes, and the full recipe (the distillation fields).
        out: The search directory to create (``config.resume``: continue the one there).
        teacher_name: Recorded in the student's metrics.
        teacher_input: The teacher's own input normalization, when it differs from the data's.
        progress: Progress bars for the finalists' training.
        log: Called with one line per step (e.g. ``print``).

    Raises:
        ConfigError: ``out`` exists without ``resume`` (or is not a search directory), or no
            candidate meets the budget (the message gives the fastest one measured).
    """
    log = log or (lambda _line: None)
    budget = float(config.latency_budget)  # type: ignore[arg-type]  # validated by SearchConfig
    out = Path(out)
    if data.val is None:  # the same hold-out as --val-split (permutation seed 0), so the CLI and Python see one split
        data = hold_out(data, config.val_split or 0.1)
    device = resolve_device(config.device)  # everything that can fail on bad input fails before OUT is written
    frozen = FrozenTeacher(teacher, device=device, channels_last=config.channels_last,
                           input_map=teacher_input_map(config, teacher_input, data.spec))
    inputs = data.test.batch_of(config.target_batch)
    saved = _open_out(out, resume=config.resume)
    record, names, specs = _start(config, data, out, saved, teacher_sha256=frozen.fingerprint())

    # 1. Latency of every candidate and of the teacher, on the target.
    cache = LatencyCache.open(config.target, config.target_threads, config.target_batch, enabled=config.latency_cache)
    meter = LatencyMeter(inputs, num_classes=data.spec.num_classes, target=config.target, threads=config.target_threads, batch=config.target_batch,
                         cache=cache, log=log)
    record.data["timing_seconds"] = record.data["timing_cache_hits"] = 0
    if "teacher" not in record.data:
        record.data["teacher"] = _teacher_entry(frozen, teacher, teacher_name, data, meter, device)
    survivors = _time_and_mark([n for n, _ in names], specs, record, meter, config)
    log(f"search: {len(survivors)} of {len(names)} candidates within {budget:.4f} ms ({record.data['timing_seconds']:.0f} s timing, "
        f"{record.data['timing_cache_hits']} from the latency cache)")
    if not survivors:
        if saved is None:
            shutil.rmtree(out, ignore_errors=True)  # nothing worth resuming: the latencies are in the cache
        raise _nothing_fits(record, config)

    # 2. Proxy: a short distillation of each survivor, slowest (most capacity) first, until the time budget says stop;
    #    then the zoo's students over budget, so the searched front can be compared with them.
    proxy = _Proxy(frozen, data, config, record, log)
    references = [n for n, origin in names if origin == "zoo" and n not in survivors]
    proxy.rank(sorted(survivors, key=lambda nm: -record.candidates[nm]["p50_ms"]) + references, specs)

    # 2b. Evolution: neighbours of the best-ranked searched students, timed and ranked like the rest, while time allows.
    survivors += _evolve(specs, record, proxy, meter, config, data, log)

    # 3. Finalists: the full recipe for the best proxies; the best on validation wins.
    ranked = sorted((n for n in survivors if "proxy_val_accuracy" in record.candidates[n]),
                    key=lambda n: (-record.candidates[n]["proxy_val_accuracy"], record.candidates[n]["p50_ms"]))
    finalists = ranked[: config.finalists]
    if not finalists:
        raise ConfigError(f"no candidate within budget was ranked in --time-budget {config.time_budget:g} minutes (timing took "
                          f"{record.data['timing_seconds']:.0f} s); raise --time-budget and --resume")
    results = _train_finalists(finalists, specs, record, teacher, data, config, out, teacher_name, teacher_input, progress, log)
    winner = _finish(record, finalists, out, log)
    return SearchResult(out=out, winner=winner, student=results.get(winner), record=record.data)


def _start(config: SearchConfig, data: DataSplits, out: Path, saved: dict[str, Any] | None, *,
           teacher_sha256: str) -> tuple[_Record, list[tuple[str, str]], dict[str, ModelSpec]]:
    """The record (fresh, or the saved one of a resumed search), the sampled and zoo candidates, and their specs."""
    header = {
        "format": SEARCH_FORMAT, "kdedge_version": __version__, "env": capture_environment(config.target_threads),
        "config": config.to_dict(), "data": data.spec.to_dict(), "teacher_sha256": teacher_sha256,
        "val_fingerprint": data.val.fingerprint(),  # type: ignore[union-attr]
        "target": {"name": config.target, "threads": config.target_threads, "batch": config.target_batch, "latency_budget_ms": config.latency_budget},
    }
    if saved is not None:
        changed = [f"{k}: {saved['config'].get(k)!r} -> {v!r}" for k, v in json.loads(json.dumps(header["config"])).items()
                   if k not in _RESUMABLE and saved["config"].get(k) != v]
        if saved.get("target") != header["target"]:
            changed.insert(0, f"target: {saved.get('target')} -> {header['target']}")
        for key, what in (("teacher_sha256", "the teacher's weights"), ("val_fingerprint", "the validation split")):
            if saved.get(key) != header[key]:
                changed.append(f"{what} changed")
        if changed:
            raise ConfigError(f"--resume: the search in {out} ran with other settings ({'; '.join(changed)}); resume with the original ones or pass a new --out")
    record = _Record(out / "search.json", header, saved)
    names = _candidate_names(config, data)
    specs = {n: _spec(n, data) for n, _ in names}
    for n, origin in names:
        c = record.candidates.setdefault(n, {"name": n, "origin": origin})
        if "params" not in c:
            c.update(_describe(n, specs[n]))
    record.save()
    return record, names, specs


def _nothing_fits(record: _Record, config: SearchConfig) -> ConfigError:
    fastest = min((c for c in record.candidates.values() if "p50_ms" in c), key=lambda c: c["p50_ms"])
    return ConfigError(f"no candidate meets {config.latency_budget:.4f} ms on {config.target} ({config.target_threads} threads, batch {config.target_batch}); "
                       f"the fastest measured, {fastest['name']}, takes {fastest['p50_ms']:.4f} ms: raise --latency-budget")


def _finish(record: _Record, finalists: list[str], out: Path, log: Callable[[str], None]) -> str:
    """The winner (best full-recipe validation accuracy; the faster on a tie) into ``out/student``; summary and plot."""
    budget = record.data["target"]["latency_budget_ms"]
    fin = record.data["finalists"]
    trained = [n for n in finalists if fin[n]["val_accuracy"] is not None]
    if not trained:
        raise ConfigError(f"every finalist diverged with the full recipe ({fin[finalists[0]]['diverged']}); fix the recipe and --resume, "
                          "or pass a new --out")
    winner = max(trained, key=lambda n: (fin[n]["val_accuracy"], -record.candidates[n]["p50_ms"]))
    _summarize(record, winner, budget)
    _publish_student(out, winner)
    record.save()
    _plot(record, out / "accuracy_vs_latency.png", budget)
    log(f"search: {winner} — val {fin[winner]['val_accuracy']:.4f}, test {fin[winner]['test_accuracy']:.4f}, "
        f"p50 {record.candidates[winner]['p50_ms']:.4f} ms (budget {budget:.4f} ms); wrote {out}")
    return winner


def _publish_student(out: Path, winner: str) -> None:
    """``out/student`` := the winner's run, replaced whole (a resumed search with more finalists may pick another)."""
    from kdedge._fs import atomic_dir

    student = out / "student"
    if (student / "model.safetensors").is_file() and load_checkpoint(student).spec.name == winner:
        return
    if student.exists():
        shutil.rmtree(student)
    with atomic_dir(student) as tmp:
        shutil.copytree(out / "finalists" / _slug(winner), tmp, dirs_exist_ok=True)


def _teacher_entry(frozen: FrozenTeacher, teacher: nn.Module, name: str | None, data: DataSplits, meter: LatencyMeter,
                   device: torch.device) -> dict[str, Any]:
    """The teacher's latency on the target (same settings as the candidates) and its validation accuracy, for the plot."""
    spec = ModelSpec("teacher", 1.0, data.spec.num_classes, tuple(data.spec.input_shape))  # type: ignore[arg-type]
    try:
        lat = meter.measure({"teacher": spec}, modules={"teacher": frozen.module.cpu().eval()})["teacher"]
    except ExportError:  # an ONNX teacher (or one torch.export cannot trace): its latency is only for the plot
        lat = {"p50_ms": None, "p90_ms": None, "ratio": None, "p90_ratio": None}
    frozen.module.to(device)
    val = evaluate(frozen.module, data.val, device=device)  # type: ignore[arg-type]
    return {"name": name or type(teacher).__name__, "p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"], "vs_anchor": lat["ratio"],
            "vs_anchor_p90": lat["p90_ratio"], "val_accuracy": val.accuracy,
            "params": count_parameters(teacher)}


def _time_and_mark(names: list[str], specs: dict[str, ModelSpec], record: _Record, meter: LatencyMeter, config: SearchConfig) -> list[str]:
    """Time ``names`` (cache first), record p50/p90 and the over-budget ones; returns those within budget."""
    budget = float(config.latency_budget)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    latencies = meter.measure({n: specs[n] for n in names})
    record.data["timing_seconds"] += time.perf_counter() - t0
    record.data["anchor"] = {"name": ANCHOR, "p50_ms": meter.anchor_p50_ms, "groups": len(meter.anchor_samples),
                             "spread": [min(meter.anchor_samples), max(meter.anchor_samples)]}
    record.data["timing_cache_hits"] += sum(v["cached"] for v in latencies.values())
    for n, lat in latencies.items():
        c = record.candidates[n]
        c.update({"p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"], "vs_anchor": lat["ratio"], "vs_anchor_p90": lat["p90_ratio"],
                  "latency_cached": lat["cached"]})
        c.pop("dropped", None)
        if lat["p50_ms"] > budget:
            c["dropped"] = f"over budget: p50 {lat['p50_ms']:.4f} ms > {budget:.4f} ms"
    record.save()
    return [n for n in names if record.candidates[n]["p50_ms"] <= budget]


def _evolve(specs: dict[str, ModelSpec], record: _Record, proxy: _Proxy, meter: LatencyMeter, config: SearchConfig,
            data: DataSplits, log: Callable[[str], None]) -> list[str]:
    """``config.generations`` rounds: ``config.children`` mutations of the 5 best-ranked searched survivors each.

    The children of each generation are recorded (``search.json`` ``generations``), so a resumed
    search re-creates the same ones. Stops early when the time budget says so.
    """
    budget = float(config.latency_budget)  # type: ignore[arg-type]
    shape = tuple(data.spec.input_shape)
    done: list[list[str]] = record.data.setdefault("generations", [])
    found: list[str] = []
    for g in range(config.generations):
        cands = record.candidates
        if g >= len(done):
            if not proxy.time_left(extra=config.children):
                log(f"search: evolution stops after {g} generation(s): the time budget is spent")
                break
            parents = sorted((n for n in cands if cands[n]["origin"] != "zoo" and cands[n]["p50_ms"] <= budget and "proxy_val_accuracy" in cands[n]),
                             key=lambda n: -cands[n]["proxy_val_accuracy"])[:5]
            if not parents:
                break
            rng = random.Random(config.seed * 1_000_003 + g)
            children: list[str] = []
            for _ in range(20 * config.children):
                if len(children) >= config.children:
                    break
                parent = rng.choice(parents)
                child = mutate(parse_genome(parent), rng, shape)  # type: ignore[arg-type]
                if child is not None and str(child) not in cands and str(child) not in children:
                    children.append(str(child))
                    cands[str(child)] = {"name": str(child), "origin": "evolved", "parent": parent, "generation": g + 1}
            done.append(children)
            record.save()
        children = done[g]
        for n in children:
            specs[n] = _spec(n, data)
            if "params" not in cands[n]:
                cands[n].update(_describe(n, specs[n]))
        within = _time_and_mark(children, specs, record, meter, config)
        proxy.rank(sorted(within, key=lambda nm: -cands[nm]["p50_ms"]), specs)
        found += within
        best = max((cands[n].get("proxy_val_accuracy", 0.0) for n in within), default=float("nan"))
        log(f"search: generation {g + 1}: {len(within)} of {len(children)} children within budget, best proxy {best:.4f}")
    return found


def _open_out(out: Path, *, resume: bool) -> dict[str, Any] | None:
    if out.exists() and not resume:
        raise ConfigError(f"{out} already exists; pass a new --out, or --resume to continue the search there")
    if resume and (out / "search.json").is_file():
        try:
            return json.loads((out / "search.json").read_text())
        except ValueError:
            raise ConfigError(f"{out / 'search.json'} is not valid JSON; remove {out} and search again") from None
    if resume and out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not a search directory (no search.json); pass a new --out")
    out.mkdir(parents=True, exist_ok=True)
    return None


class _Proxy:
    """The cheap accuracy estimate: ``proxy_epochs`` of distillation on ``proxy_samples`` training images
    (teacher logits from the cache), scored on the validation split.

    It also keeps the time budget: once ``finalists`` candidates are ranked it knows what a proxy
    costs and, scaled by images seen, what a full-recipe finalist will; a candidate is not ranked when
    ranking it would leave too little time for the finalists.
    """

    def __init__(self, frozen: FrozenTeacher, data: DataSplits, config: SearchConfig, record: _Record, log: Callable[[str], None]) -> None:
        from kdedge._fs import cache_dir

        self.frozen, self.data, self.config, self.record, self.log = frozen, data, config, record, log
        # No sanity checks: a candidate stuck near chance after a short run is a low score, not an error that ends the search.
        self.pconfig = dataclasses.replace(config, epochs=config.proxy_epochs, resume=False, out=None, warmup_epochs=0.0, sanity_checks=False)
        self.n = min(config.proxy_samples, len(data.train))
        rows = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(config.seed))[: self.n].sort().values
        self.train = data.train.subset(rows)
        self.loss = make_loss(self.pconfig)
        self.cache_dir = cache_dir() / "logits" if config.cache == "disk" else None
        self.device = resolve_device(config.device)

    def _spent(self) -> list[float]:
        return [c["proxy_seconds"] for c in self.record.candidates.values() if "proxy_seconds" in c]

    def time_left(self, extra: int = 1) -> bool:
        """Whether ``extra`` more proxies fit in the time budget next to the finalists' full recipe."""
        spent = self._spent()
        if len(spent) < self.config.finalists:
            return True
        per_proxy = float(np.median(spent))
        full = per_proxy * (self.config.epochs * len(self.data.train)) / (self.config.proxy_epochs * self.n)
        return self.record.elapsed() + extra * per_proxy + self.config.finalists * full <= 60 * self.config.time_budget

    def rank(self, names: list[str], specs: dict[str, ModelSpec]) -> None:
        for name in names:
            c = self.record.candidates[name]
            if "proxy_val_accuracy" in c:
                continue
            if not self.time_left():
                c.setdefault("dropped", "not ranked: the time budget ran out (raise --time-budget)")
                continue
            t0 = time.perf_counter()
            torch.manual_seed(self.config.seed)
            model = create_model(specs[name])
            fit(model, self.train, config=self.pconfig, loss=self.loss, teacher=self.frozen, cache_dir=self.cache_dir,
                use_cache=self.config.cache != "off", progress=False)
            acc = evaluate(model, self.data.val, device=self.device).accuracy  # type: ignore[arg-type]
            c.update({"proxy_val_accuracy": acc, "proxy_seconds": time.perf_counter() - t0})
            if c["p50_ms"] <= float(self.config.latency_budget):  # type: ignore[arg-type]
                c.pop("dropped", None)  # ranked after all: a resumed search with more time
            self.record.save()
            self.log(f"search: proxy {name:<44} p50 {c['p50_ms']:.4f} ms  val {acc:.4f}  ({c['proxy_seconds']:.1f} s)")


def _slug(name: str) -> str:
    return name.replace("net:", "net-").replace("@", "_w").replace(":", "-")


def _train_finalists(finalists: list[str], specs: dict[str, ModelSpec], record: _Record, teacher: nn.Module, data: DataSplits, config: SearchConfig,
                     out: Path, teacher_name: str | None, teacher_input: Normalization | None, progress: bool,
                     log: Callable[[str], None]) -> dict[str, RunResult]:
    results: dict[str, RunResult] = {}
    for name in finalists:
        if name in record.data["finalists"]:
            continue
        run_dir = out / "finalists" / _slug(name)
        partial = run_dir.with_name(run_dir.name + ".partial")
        if run_dir.exists():  # finished before a kill, not yet recorded
            shutil.rmtree(run_dir)
        log(f"search: full recipe ({config.epochs} epochs) for finalist {name}")
        torch.manual_seed(config.seed)
        student = create_model(specs[name])
        # The finalist's own run: the distillation fields only, naming the student it trains, so its config.yaml repeats it.
        fconfig = DistillConfig(**{k: v for k, v in vars(config).items() if k in DistillConfig.__dataclass_fields__}
                                | {"student": name, "resume": partial.exists(), "out": None, "val_split": None})
        try:
            result = distill(student, teacher, data.train, data.test, val_data=data.val, config=fconfig, student_spec=specs[name],
                             teacher_name=teacher_name, teacher_input=teacher_input, out=run_dir, progress=progress)
        except TrainingDiverged as exc:  # one finalist's recipe failing is not the search failing: the others may win
            record.data["finalists"][name] = {"val_accuracy": None, "test_accuracy": None, "diverged": str(exc),
                                              "proxy_val_accuracy": record.candidates[name]["proxy_val_accuracy"]}
            record.save()
            log(f"search: finalist {name} diverged: {exc}")
            continue
        results[name] = result
        record.data["finalists"][name] = {"val_accuracy": result.val.accuracy if result.val else None,
                                          "test_accuracy": result.test.accuracy if result.test else None,
                                          "proxy_val_accuracy": record.candidates[name]["proxy_val_accuracy"],
                                          "seconds": result.metrics["seconds"], "run": str(run_dir.relative_to(out))}
        record.candidates[name]["final_val_accuracy"] = result.val.accuracy if result.val else None
        record.candidates[name]["final_test_accuracy"] = result.test.accuracy if result.test else None
        record.save()
    return results


def _summarize(record: _Record, winner: str, budget: float) -> None:
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
    record.data.update({
        "winner": winner,
        "winner_p50_ms": cands[winner]["p50_ms"],
        "within_budget": cands[winner]["p50_ms"] <= budget,
        "proxy_rank_correlation": {"spearman": rho, "n": len(names), "over": "finalists (proxy val accuracy vs full-recipe val accuracy)"},
        "zoo_dominated_by": dominance,
    })


def _plot(record: _Record, path: Path, budget: float) -> None:
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
    ax.set_xlabel(f"p50 latency on {target['name']}, {target['threads']} thread(s), batch {target['batch']} (µs, log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"kdedge search: accuracy vs measured latency (winner {record.data['winner']})", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run_search(config: SearchConfig, *, progress: bool = False, log: Callable[[str], None] | None = None, trust_code: bool = False) -> SearchResult:
    """``kdedge search``: resolve the data and the teacher that ``config`` names, then :func:`search`."""
    from kdedge._fs import default_out
    from kdedge.data.sources import load_data_for
    from kdedge.resolve import resolve_teacher

    out = Path(config.out) if config.out else default_out("search")
    if out.exists() and not config.resume:  # before the data and the teacher load
        raise ConfigError(f"{out} already exists; pass a new --out, or --resume to continue the search there")
    data = load_data_for(config)
    teacher = resolve_teacher(config.teacher, data.spec, weights=config.teacher_weights, trust_code=trust_code)
    return search(teacher.model, data, config=config, out=out, teacher_name=teacher.name, teacher_input=teacher.input, progress=progress, log=log)
