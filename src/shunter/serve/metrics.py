"""The server's Prometheus metrics, in a registry of its own (one per app, so tests can run several)."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # no *_created series: a scrape shows the counts only

# latency buckets in seconds: a tiny model on a CPU answers in milliseconds, a streamed one in seconds
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "shunter_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("shunter_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("shunter_generation_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "shunter_time_to_first_token_seconds",
            "from a request's arrival to its first generated token",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "shunter_inter_token_latency_seconds",
            "between consecutive tokens of one sequence",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.active_sequences = Gauge(
            "shunter_active_sequences", "sequences in the running batch", registry=r
        )
        self.queued_sequences = Gauge(
            "shunter_queued_sequences", "requests waiting for a KV slot", registry=r
        )
        self.engine_steps = Counter(
            "shunter_engine_steps", "engine steps (prefill and/or decode)", registry=r
        )
        self.step_sequences = Histogram(
            "shunter_step_sequences",
            "sequences in one decode forward",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.disk_read_bytes = Counter(
            "shunter_disk_read_bytes", "weight bytes read from disk (offload engine)", registry=r
        )
        self.prefetch_hit_rate = Gauge(
            "shunter_prefetch_hit_rate",
            "share of prefetched experts the gate then chose (offload engine)",
            registry=r,
        )
        self.expert_activations = Counter(
            "shunter_expert_activations",
            "tokens routed to each expert, by model layer",
            ["layer", "expert"],
            registry=r,
        )


class ExpertCounter:
    """A routing recorder (the executors' `recorder` argument) that only counts tokens per expert
    and layer into the metrics, instead of keeping every choice as RoutingRecorder does."""

    def __init__(self, metrics: ServerMetrics, num_experts: int) -> None:
        self.metrics, self.num_experts = metrics, num_experts

    def record_tokens(self, token_ids: torch.Tensor, keep: torch.Tensor | None) -> None:
        pass  # the token ids themselves are not counted

    def record(
        self, layer: int, expert_ids: torch.Tensor, gate_weights: torch.Tensor, keep: torch.Tensor | None
    ) -> None:
        """expert_ids [N, k] of one forward's N tokens; keep [N] drops padding."""
        if keep is not None:
            expert_ids = expert_ids[keep.to(expert_ids.device)]
        counts = torch.bincount(expert_ids.reshape(-1).cpu(), minlength=self.num_experts).tolist()
        for expert, count in enumerate(counts):
            if count:
                self.metrics.expert_activations.labels(str(layer), str(expert)).inc(count)
