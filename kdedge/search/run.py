"""``kdedge search``: the most accurate student that meets a latency budget measured on the target.

    sample candidates ──► export + time on the target (cached) ──► drop over budget
        ──► proxy: short distillation on cached teacher logits, scored on validation
        ──► finalists: the full recipe ──► the best on validation is DIR/student

Everything the search learns is written to ``DIR/search.json`` as it goes, so ``--resume``
continues a killed search where it stopped (latencies come back from the cache, proxy scores
and finished finalists from ``search.json``).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdedge._fs import Claim, claim_workdir
from kdedge._version import __version__
from kdedge.bench.env import capture_environment
from kdedge.bench.runners import TARGETS, target_available
from kdedge.exporters.edge import EDGE_FORMATS, edge_unavailable
from kdedge.config import DistillConfig, SearchConfig
from kdedge.data.normalization import Normalization
from kdedge.data.sources import hold_out
from kdedge.data.spec import DataSplits
from kdedge.distill.checkpoint import config_differences
from kdedge.distill.loop import resolve_device
from kdedge.distill.teacher import FrozenTeacher, teacher_input_map
from kdedge.tblog import sub_dir
from kdedge.errors import BackendUnavailable, ConfigError, KdedgeError, TrainingDiverged
from kdedge.metrics import evaluate
from kdedge.models import ModelSpec, count_parameters, create_model, load_checkpoint
from kdedge.models.genome import parse_genome
from kdedge.models.zoo import MODELS, TEACHERS, model_cost, onnx_file_of, parse_model_name, runs_outside_torch
from kdedge.runs import RunResult, distill
from kdedge.search.latency import ANCHOR, LatencyCache, LatencyMeter
from kdedge.search.proxy import Proxy
from kdedge.search.record import SearchRecord, plot, summarize
from kdedge.search.space import SearchSpace, mutate, sample_genomes

__all__ = ["ZOO_STUDENTS", "SearchResult", "run_search", "search"]

SEARCH_FORMAT = 1
#: Settings a resumed search may change: they decide how long it runs and where, not what it measures.
_RESUMABLE = frozenset({"time_budget", "finalists", "generations", "out", "resume", "device", "workers", "threads", "latency_cache", "progress", "log_dir"})
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


def _space(config: SearchConfig) -> SearchSpace:
    """The space candidates are sampled from and mutated in: the config's block kinds and squeeze-excitation."""
    return SearchSpace(kinds=tuple(config.block_kinds), se=config.squeeze_excite)


def _spec(name: str, data: DataSplits) -> ModelSpec:
    arch, width = parse_model_name(name)
    return ModelSpec(arch, width, data.spec.num_classes, tuple(data.spec.input_shape))  # type: ignore[arg-type]


def _candidate_names(config: SearchConfig, data: DataSplits) -> list[tuple[str, str]]:
    """(name, origin) for every candidate: sampled genomes, then the zoo's students (searched first)."""
    names = [(str(g), "searched") for g in sample_genomes(config.candidates, tuple(data.spec.input_shape), seed=config.seed, space=_space(config))]  # type: ignore[arg-type]
    if config.include_zoo:
        zoo = [n for n in ZOO_STUDENTS if n.partition("@")[0] in MODELS.keys() - TEACHERS]
        names += [(n, "zoo") for n in zoo]
    return names


def search(
    teacher: nn.Module,
    data: DataSplits,
    *,
    config: SearchConfig,
    out: str | Path | Claim | None,
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
        out: The search directory to create (``config.resume``: continue the one there; None: a new
            ``runs/search-<time>``). It is claimed for the whole search: a second search in it is refused.
        teacher_name: Recorded in the student's metrics.
        teacher_input: The teacher's own input normalization, when it differs from the data's.
        progress: Progress bars for the finalists' training.
        log: Called with one line per step (e.g. ``print``).

    Raises:
        ConfigError: ``out`` exists without ``resume`` (or is not a search directory), or no
            candidate meets the budget (the message gives the fastest one measured).
    """
    with _search_dir(out, resume=config.resume) as claim:
        return _search(teacher, data, config=config, out=claim.path, teacher_name=teacher_name, teacher_input=teacher_input, progress=progress,
                       log=log or (lambda _line: None))


@contextlib.contextmanager
def _search_dir(out: str | Path | Claim | None, *, resume: bool) -> Iterator[Claim]:
    """The search directory, claimed for the block (a :class:`Claim` the caller holds is used as it is).

    A new one that ends without a record (bad input, an interrupt before any timing) is removed:
    nothing in it is worth resuming.
    """
    if isinstance(out, Claim):
        yield out
        return
    claim = claim_workdir(out, "search", resume=resume)
    try:
        yield claim
    except BaseException:
        if not resume and not (claim.path / "search.json").is_file():
            shutil.rmtree(claim.path, ignore_errors=True)
        raise
    finally:
        claim.release()


def _search(teacher: nn.Module, data: DataSplits, *, config: SearchConfig, out: Path, teacher_name: str | None, teacher_input: Normalization | None,
            progress: bool, log: Callable[[str], None]) -> SearchResult:
    budget = float(config.latency_budget)  # type: ignore[arg-type]  # validated by SearchConfig
    if data.val is None:  # the same hold-out as --val-split (permutation seed 0), so the CLI and Python see one split
        data = hold_out(data, config.val_split or 0.1)
    device = resolve_device(config.device)  # everything that can fail on bad input fails before OUT is written
    if why := target_available(config.target):  # a CUDA target without a GPU, an edge runtime not installed
        raise BackendUnavailable(f"--target {why}")
    runtime = TARGETS[config.target][0]
    if runtime in EDGE_FORMATS and (why := edge_unavailable(runtime, purpose="export")):  # every candidate is exported to it
        raise BackendUnavailable(f"--target {config.target}: {why}")
    with FrozenTeacher(teacher, device=device, channels_last=config.channels_last,
                       input_map=teacher_input_map(config, teacher_input, data.spec)) as frozen:
        inputs = data.test.batch_of(max(config.target_batch, LatencyMeter.CALIBRATION if config.target_precision == "int8" else 1))
        saved = _open_out(out, resume=config.resume)
        record, names, specs = _start(config, data, out, saved, teacher_sha256=frozen.fingerprint())

        # 1. Latency of every candidate and of the teacher, on the target.
        cache = LatencyCache.open(config.target, config.target_threads, config.target_batch, precision=config.target_precision,
                                  enabled=config.latency_cache)
        meter = LatencyMeter(inputs, num_classes=data.spec.num_classes, target=config.target, threads=config.target_threads, batch=config.target_batch,
                             cache=cache, log=log, precision=config.target_precision)
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
        proxy = Proxy(frozen, data, config, record, log)
        references = [n for n, origin in names if origin == "zoo" and n not in survivors and "p50_ms" in record.candidates[n]]
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
        _head_to_head(record, finalists, specs, meter, log)
        winner = _finish(record, finalists, out, log)
        return SearchResult(out=out, winner=winner, student=results.get(winner), record=record.data)


def _start(config: SearchConfig, data: DataSplits, out: Path, saved: dict[str, Any] | None, *,
           teacher_sha256: str) -> tuple[SearchRecord, list[tuple[str, str]], dict[str, ModelSpec]]:
    """The record (fresh, or the saved one of a resumed search), the sampled and zoo candidates, and their specs."""
    header = {
        "format": SEARCH_FORMAT, "kdedge_version": __version__, "env": capture_environment(config.target_threads),
        "config": config.to_dict(), "data": data.spec.to_dict(), "teacher_sha256": teacher_sha256,
        "val_fingerprint": data.val.fingerprint(),  # type: ignore[union-attr]
        "target": {"name": config.target, "precision": config.target_precision, "threads": config.target_threads, "batch": config.target_batch,
                   "latency_budget_ms": config.latency_budget},
    }
    if saved is not None:
        # a search recorded before the richer blocks existed searched the dense and depthwise ones, without squeeze-excitation
        # (and timed FP32: the precision came with the edge targets)
        changed = config_differences(saved["config"], json.loads(json.dumps(header["config"])),
                                     {"block_kinds": ["c", "d"], "squeeze_excite": 0.0, "target_precision": "fp32"}, resumable=_RESUMABLE)
        if {"precision": "fp32"} | (saved.get("target") or {}) != header["target"]:
            changed.insert(0, f"target: {saved.get('target')} -> {header['target']}")
        for key, what in (("teacher_sha256", "the teacher's weights"), ("val_fingerprint", "the validation split")):
            if saved.get(key) != header[key]:
                changed.append(f"{what} changed")
        if changed:
            raise ConfigError(f"--resume: the search in {out} ran with other settings ({'; '.join(changed)}); resume with the original ones or pass a new --out")
    record = SearchRecord(out / "search.json", header, saved)
    names = _candidate_names(config, data)
    specs = {n: _spec(n, data) for n, _ in names}
    for n, origin in names:
        c = record.candidates.setdefault(n, {"name": n, "origin": origin})
        if "params" not in c:
            c.update(model_cost(n, specs[n].num_classes, specs[n].input_shape))
    record.save()
    return record, names, specs


def _nothing_fits(record: SearchRecord, config: SearchConfig) -> ConfigError:
    fastest = min((c for c in record.candidates.values() if "p50_ms" in c), key=lambda c: c["p50_ms"])
    return ConfigError(f"no candidate meets {config.latency_budget:.4f} ms on {config.target} {config.target_precision} ({config.target_threads} threads, batch {config.target_batch}); "
                       f"the fastest measured, {fastest['name']}, takes {fastest['p50_ms']:.4f} ms: raise --latency-budget")


def _finish(record: SearchRecord, finalists: list[str], out: Path, log: Callable[[str], None]) -> str:
    """The winner (best full-recipe validation accuracy; the faster on a tie) into ``out/student``; summary and plot."""
    budget = record.data["target"]["latency_budget_ms"]
    fin = record.data["finalists"]
    trained = [n for n in finalists if fin[n]["val_accuracy"] is not None]
    if not trained:
        raise ConfigError(f"every finalist diverged with the full recipe ({fin[finalists[0]]['diverged']}); fix the recipe and --resume, "
                          "or pass a new --out")
    h2h = record.data.get("head_to_head", {}).get("models", {})
    winner = pick(trained, {n: fin[n]["val_accuracy"] for n in trained}, {n: record.candidates[n]["p50_ms"] for n in trained},
                  {n: v["p50_ms"] for n, v in h2h.items()}, budget)
    if h2h:
        record.data["head_to_head"]["pick_by_validation"] = pick(trained, {n: fin[n]["val_accuracy"] for n in trained},
                                                                 {n: record.candidates[n]["p50_ms"] for n in trained}, {}, budget)
        if h2h[winner]["p50_ms"] > budget:
            log(f"search: every finalist measured over the budget when re-timed head to head; {winner} is the fastest of them "
                f"({h2h[winner]['p50_ms']:.4f} ms > {budget:.4f} ms): search.json records within_budget false")
    summarize(record, winner, budget)
    _publish_student(out, winner)
    record.save()
    plot(record, out / "accuracy_vs_latency.png", budget)
    log(f"search: {winner} — val {fin[winner]['val_accuracy']:.4f}, test {fin[winner]['test_accuracy']:.4f}, "
        f"p50 {record.data['winner_p50_ms']:.4f} ms (budget {budget:.4f} ms); wrote {out}")
    return winner


def pick(names: list[str], accuracy: dict[str, float], searched_p50: dict[str, float], retimed_p50: dict[str, float], budget: float) -> str:
    """The search's pick among trained finalists: the most accurate on validation (the faster on a tie) of those within
    ``budget`` on their head-to-head re-timing (``retimed_p50``; a finalist not re-timed counts as within); when none
    is, the fastest re-timed."""
    within = [n for n in names if retimed_p50.get(n, 0.0) <= budget]
    if within:
        return max(within, key=lambda n: (accuracy[n], -searched_p50[n]))
    return min(names, key=lambda n: retimed_p50[n])


#: Blocks per model when the finalists are re-timed head to head: twice a search group's, on the few models that decide.
HEAD_TO_HEAD_ROUNDS = 15


def _head_to_head(record: SearchRecord, finalists: list[str], specs: dict[str, ModelSpec], meter: LatencyMeter, log: Callable[[str], None]) -> None:
    """Re-time the trained finalists together (the pick and its runners-up, head to head, with the anchor), ignoring the cache.

    A search's latencies are ratios measured minutes apart (or cached from another day); the pick
    is the model that ships, so its p50 and its standing against the runner-up are measured again
    in one group, with :data:`HEAD_TO_HEAD_ROUNDS` blocks each. A finalist over the budget on this
    measurement is not picked (:func:`_finish`); ``search.json`` ``head_to_head`` keeps the numbers.
    """
    fin = record.data["finalists"]
    trained = [n for n in finalists if fin.get(n, {}).get("val_accuracy") is not None]
    if not trained:
        return
    budget = record.data["target"]["latency_budget_ms"]
    lat = meter.measure({n: specs[n] for n in trained}, fresh=True, rounds=HEAD_TO_HEAD_ROUNDS)
    models = {n: {"p50_ms": v["p50_ms"], "vs_anchor": v["ratio"], "spread": v["spread"], "p50_range_ms": v["p50_range_ms"],
                  "searched_p50_ms": record.candidates[n]["p50_ms"], "within_budget": v["p50_ms"] <= budget} for n, v in lat.items()}
    record.data["head_to_head"] = {"rounds": HEAD_TO_HEAD_ROUNDS, "anchor_p50_ms": meter.anchor_p50_ms, "models": models}
    log("search: finalists re-timed head to head: " + ", ".join(f"{n} {v['p50_ms']:.4f} ms (searched {v['searched_p50_ms']:.4f}, spread "
                                                                 f"{v['spread']:.0%})" for n, v in models.items()))
    record.save()


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
    lat: dict[str, Any] = {"p50_ms": None, "p90_ms": None, "ratio": None, "p90_ratio": None}
    onnx_file = onnx_file_of(teacher)
    unknown = None
    if onnx_file is not None and (meter.target != "ort-cpu" or meter.precision != "fp32"):
        unknown = f"an ONNX teacher is timed as it is, on ort-cpu at fp32; not on {meter.target} at {meter.precision}"
    else:
        try:  # an ONNX teacher is timed as its own file (the input map, one multiply-add, is left out)
            lat = meter.measure({"teacher": spec}, modules={} if onnx_file else {"teacher": frozen.module.cpu().eval()},
                                files={"teacher": onnx_file} if onnx_file else None)["teacher"]
        except KdedgeError as exc:  # one torch.export cannot trace: its latency is only for the plot, not worth the search
            unknown = f"not timed: {exc}"
    frozen.module.to(device)
    val = evaluate(frozen.module, data.val, device=device)  # type: ignore[arg-type]
    return {"name": name or type(teacher).__name__, "p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"], "vs_anchor": lat["ratio"],
            "vs_anchor_p90": lat["p90_ratio"], "val_accuracy": val.accuracy, **({"latency_unknown": unknown} if unknown else {}),
            "params": None if runs_outside_torch(teacher) else count_parameters(teacher)}


def _time_and_mark(names: list[str], specs: dict[str, ModelSpec], record: SearchRecord, meter: LatencyMeter, config: SearchConfig) -> list[str]:
    """Time ``names`` (cache first), record p50/p90 and the over-budget ones; returns those within budget."""
    budget = float(config.latency_budget)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    latencies = meter.measure({n: specs[n] for n in names}, failures="record")  # one the converter refuses is dropped, not fatal
    record.data["timing_seconds"] += time.perf_counter() - t0
    record.data["anchor"] = {"name": ANCHOR, "p50_ms": meter.anchor_p50_ms, "groups": len(meter.anchor_samples),
                             "spread": [min(meter.anchor_samples), max(meter.anchor_samples)]}
    record.data["timing_cache_hits"] += sum(v["cached"] for v in latencies.values())
    for n, lat in latencies.items():
        c = record.candidates[n]
        if "error" in lat:
            for key in ("p50_ms", "p90_ms", "vs_anchor", "vs_anchor_p90", "latency_spread", "latency_cached"):
                c.pop(key, None)
            c["dropped"] = f"cannot be timed on {config.target} {config.target_precision}: {lat['error']}"
            continue
        c.update({"p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"], "vs_anchor": lat["ratio"], "vs_anchor_p90": lat["p90_ratio"],
                  "latency_spread": lat["spread"], "latency_cached": lat["cached"]})
        if lat["remeasured"]:
            c["latency_remeasured"] = True
        c.pop("dropped", None)
        if lat["p50_ms"] > budget:
            c["dropped"] = f"over budget: p50 {lat['p50_ms']:.4f} ms > {budget:.4f} ms"
    record.save()
    return [n for n in names if record.candidates[n].get("p50_ms", math.inf) <= budget]


def _evolve(specs: dict[str, ModelSpec], record: SearchRecord, proxy: Proxy, meter: LatencyMeter, config: SearchConfig,
            data: DataSplits, log: Callable[[str], None]) -> list[str]:
    """``config.generations`` rounds: ``config.children`` mutations of the 5 best-ranked searched survivors each.

    The children of each generation are recorded (``search.json`` ``generations``), so a resumed
    search re-creates the same ones. Stops early when the time budget says so.
    """
    budget = float(config.latency_budget)  # type: ignore[arg-type]
    shape, space = tuple(data.spec.input_shape), _space(config)
    done: list[list[str]] = record.data.setdefault("generations", [])
    found: list[str] = []
    for g in range(config.generations):
        cands = record.candidates
        if g >= len(done):
            if not proxy.time_left(extra=config.children):
                log(f"search: evolution stops after {g} generation(s): the time budget is spent")
                break
            parents = sorted((n for n in cands if cands[n]["origin"] != "zoo" and "proxy_val_accuracy" in cands[n] and cands[n]["p50_ms"] <= budget),
                             key=lambda n: -cands[n]["proxy_val_accuracy"])[:5]
            if not parents:
                break
            rng = random.Random(config.seed * 1_000_003 + g)
            children: list[str] = []
            for _ in range(20 * config.children):
                if len(children) >= config.children:
                    break
                parent = rng.choice(parents)
                child = mutate(parse_genome(parent), rng, shape, space)  # type: ignore[arg-type]
                if child is not None and str(child) not in cands and str(child) not in children:
                    children.append(str(child))
                    cands[str(child)] = {"name": str(child), "origin": "evolved", "parent": parent, "generation": g + 1}
            done.append(children)
            record.save()
        children = done[g]
        for n in children:
            specs[n] = _spec(n, data)
            if "params" not in cands[n]:
                cands[n].update(model_cost(n, specs[n].num_classes, specs[n].input_shape))
        within = _time_and_mark(children, specs, record, meter, config)
        proxy.rank(sorted(within, key=lambda nm: -cands[nm]["p50_ms"]), specs)
        found += within
        best = max((cands[n].get("proxy_val_accuracy", 0.0) for n in within), default=float("nan"))
        log(f"search: generation {g + 1}: {len(within)} of {len(children)} children within budget, best proxy {best:.4f}")
    return found


def _open_out(out: Path, *, resume: bool) -> dict[str, Any] | None:
    """The saved record of a resumed search, or None for a new one; ``out`` is claimed (:func:`~kdedge._fs.claim_workdir`)."""
    if resume and (out / "search.json").is_file():
        try:
            return json.loads((out / "search.json").read_text())
        except ValueError:
            raise ConfigError(f"{out / 'search.json'} is not valid JSON; remove {out} and search again") from None
    if resume and any(out.iterdir()):
        raise ConfigError(f"{out} is not a search directory (no search.json); pass a new --out")
    return None


def _slug(name: str) -> str:
    return name.replace("net:", "net-").replace("@", "_w").replace(":", "-")


def _train_finalists(finalists: list[str], specs: dict[str, ModelSpec], record: SearchRecord, teacher: nn.Module, data: DataSplits, config: SearchConfig,
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
                                | {"student": name, "resume": (partial / "checkpoint.pt").is_file(), "out": None, "val_split": None,
                                   "log_dir": sub_dir(config.log_dir, f"finalist-{name}")})
        try:
            result = distill(student, teacher, data.train, data.test, val_data=data.val, config=fconfig, student_spec=specs[name],
                             teacher_name=teacher_name, teacher_input=teacher_input, out=run_dir, progress=progress)
        except TrainingDiverged as exc:  # one finalist's recipe failing is not the search failing: the others may win
            shutil.rmtree(partial, ignore_errors=True)  # recorded as diverged, never resumed: its kept checkpoint goes
            why = exc.__cause__ if isinstance(exc.__cause__, TrainingDiverged) else exc  # without the note on resuming it by hand
            record.data["finalists"][name] = {"val_accuracy": None, "test_accuracy": None, "diverged": str(why),
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


def run_search(config: SearchConfig, *, progress: bool = False, log: Callable[[str], None] | None = None, trust_code: bool = False) -> SearchResult:
    """``kdedge search``: resolve the data and the teacher that ``config`` names, then :func:`search`."""
    from kdedge.data.sources import load_data_for
    from kdedge.resolve import resolve_teacher

    with _search_dir(config.out, resume=config.resume) as claim:  # before the data and the teacher load; a second search never shares it
        data = load_data_for(config)
        teacher = resolve_teacher(config.teacher, data.spec, weights=config.teacher_weights, trust_code=trust_code)
        return search(teacher.model, data, config=config, out=claim, teacher_name=teacher.name, teacher_input=teacher.input, progress=progress, log=log)
