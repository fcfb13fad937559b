"""Routing traces: which experts each token chose, recorded from real forwards, and their statistics."""

from shunter.trace.routing_trace import RoutingRecorder, RoutingTrace, load_trace
from shunter.trace.stats import (
    expert_load,
    load_skew,
    popularity,
    successor_hit_rate,
    transition_counts,
    transition_mutual_information,
)

__all__ = [
    "RoutingRecorder",
    "RoutingTrace",
    "expert_load",
    "load_skew",
    "load_trace",
    "popularity",
    "successor_hit_rate",
    "transition_counts",
    "transition_mutual_information",
]
