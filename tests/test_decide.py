"""The one decision's rule (issue 27, item 5): the most accurate in-budget file ships, each other row says why it lost."""

from __future__ import annotations

import pytest

from kdedge.errors import ConfigError
from kdedge.search.decide import _choose, _verdicts, decide


def _row(name: str, precision: str, acc: float, p50: float, budget: float = 0.02) -> dict:
    return {"contender": name, "precision": precision, "architecture": name, "val_accuracy": acc, "p50_ms": p50, "within_budget": p50 <= budget,
            "blocks_ms": [p50 * f for f in (0.98, 1.0, 1.03)]}


def test_the_most_accurate_file_within_the_budget_ships_and_every_other_says_why():
    rows = [_row("pruned", "fp32", 0.935, 0.050), _row("pruned", "int8", 0.931, 0.019), _row("searched", "int8", 0.925, 0.012),
            _row("student", "int8", 0.921, 0.010), {"contender": "student", "precision": "fp32", "architecture": "s", "error": "refused"}]
    winner = _choose(rows, 0.02, tie=0.0)
    assert (winner["contender"], winner["precision"]) == ("pruned", "int8")
    _verdicts(rows, winner, 0.02)
    verdicts = {(r["contender"], r["precision"]): r["verdict"] for r in rows}
    assert verdicts[("pruned", "int8")] == "shipped"
    assert verdicts[("pruned", "fp32")] == "over budget: p50 50.0 µs > 20.0 µs"
    assert verdicts[("searched", "int8")] == "less accurate: validation 92.50 % < 93.10 %"
    assert verdicts[("student", "fp32")] == "cannot run on the target: refused"
    # the head to head: each rival's per-round p50 over the winner's, from the same interleaved blocks
    assert rows[2]["p50_vs_winner"] == pytest.approx(0.012 / 0.019)


def test_a_tie_goes_to_the_faster_file_and_no_file_in_budget_chooses_none():
    rows = [_row("a", "fp32", 0.930, 0.015), _row("b", "int8", 0.929, 0.008)]
    assert _choose(rows, 0.02, tie=0.0)["contender"] == "a"
    assert _choose(rows, 0.02, tie=0.2)["contender"] == "b"  # 0.1 pt apart: within a 0.2 pt tie the faster ships
    assert _choose([dict(r, within_budget=False) for r in rows], 0.005, tie=0.0) is None


def test_decide_refuses_what_it_cannot_weigh(tmp_path):
    with pytest.raises(ConfigError, match="at least one trained contender; searched: no candidate meets"):
        decide([], None, target="ort-cpu", budget_ms=1.0, calibration=None, work=tmp_path,  # type: ignore[arg-type]
               not_built={"searched": "no candidate meets the budget"})


def test_a_budget_refuses_what_would_ship_another_file_than_the_one_decided():
    from kdedge.bundle import resolve_auto
    from kdedge.config import CompressConfig

    for kwargs, message in [({"input_format": "uint8"}, "decides on files that take float input"),
                            ({"keep_float": 1}, "quantized INT8 files, and keep_float"),
                            ({"contenders": ("x",)}, "contenders must be one or more of searched, pruned, student")]:
        with pytest.raises(ConfigError, match=message):
            CompressConfig(latency_budget=0.02, **kwargs)
    with pytest.raises(ConfigError, match="compete for a latency budget, and no latency_budget"):
        CompressConfig(contenders=("student",))
    formats, targets = resolve_auto(CompressConfig(latency_budget=0.02, target="litert-cpu"))
    assert {"litert", "litert-int8"} <= set(formats) and "litert-cpu" in targets
    with pytest.raises(ConfigError, match="--targets lacks it"):
        resolve_auto(CompressConfig(latency_budget=0.02, target="ort-cpu", targets=("torch-cpu",)))
