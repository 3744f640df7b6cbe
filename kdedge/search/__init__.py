"""Latency-first students: search architectures against a latency budget measured on the deployment target."""

from kdedge.search.decide import Contender, Decision, decide
from kdedge.search.latency import ANCHOR, LatencyCache, LatencyMeter, environment_key, time_candidates
from kdedge.search.record import SearchRecord, spearman
from kdedge.search.run import ZOO_STUDENTS, SearchResult, run_search, search
from kdedge.search.space import SearchSpace, mutate, sample_genomes

__all__ = [
    "ANCHOR",
    "Contender",
    "Decision",
    "ZOO_STUDENTS",
    "LatencyCache",
    "LatencyMeter",
    "SearchRecord",
    "SearchResult",
    "SearchSpace",
    "decide",
    "environment_key",
    "mutate",
    "run_search",
    "sample_genomes",
    "search",
    "spearman",
    "time_candidates",
]
