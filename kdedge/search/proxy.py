"""The cheap accuracy estimate that ranks candidates, and the time budget it keeps."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from kdedge.config import SearchConfig
from kdedge.data.spec import DataSplits, stratified_rows
from kdedge.distill.factory import make_loss
from kdedge.distill.loop import fit, resolve_device
from kdedge.distill.teacher import FrozenTeacher
from kdedge.metrics import evaluate
from kdedge.models import ModelSpec, create_model
from kdedge.search.record import SearchRecord

__all__ = ["Proxy"]


class Proxy:
    """The cheap accuracy estimate: ``proxy_epochs`` of distillation on ``proxy_samples`` training images
    (teacher logits from the cache), scored on the validation split.

    It also keeps the time budget: once ``finalists`` candidates are ranked it knows what a proxy
    costs and, scaled by images seen, what a full-recipe finalist will; a candidate is not ranked when
    ranking it would leave too little time for the finalists.
    """

    def __init__(self, frozen: FrozenTeacher, data: DataSplits, config: SearchConfig, record: SearchRecord, log: Callable[[str], None]) -> None:
        from kdedge._fs import cache_dir

        self.frozen, self.data, self.config, self.record, self.log = frozen, data, config, record, log
        # No sanity checks: a candidate stuck near chance after a short run is a low score, not an error that ends the search.
        self.pconfig = dataclasses.replace(config, epochs=config.proxy_epochs, resume=False, out=None, warmup_epochs=0.0, sanity_checks=False,
                                           log_dir=None)  # hundreds of short proxy runs: not logged
        self.n = min(config.proxy_samples, len(data.train))
        self.train = data.train.subset(stratified_rows(data.train.labels, self.n, seed=config.seed))
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
