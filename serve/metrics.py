"""
Serving metrics of the engine replicas as Ray metrics (ray.util.metrics): the Ray dashboard's metrics view, and
every node's Prometheus export, where Ray adds the `ray_` prefix (`ray_nanochat_serve_ttft_seconds_bucket`, ...).

    name (Prometheus: ray_<name>)                  kind       meaning
    nanochat_serve_ttft_seconds                    histogram  request arrival at the replica -> first token
    nanochat_serve_tpot_seconds                    histogram  time per output token after the first (per request)
    nanochat_serve_output_tokens_total             counter    generated tokens (tokens/s = rate(...))
    nanochat_serve_running_requests                gauge      requests in the batch
    nanochat_serve_waiting_requests                gauge      requests queued in the replica for a batch row
    nanochat_serve_batch_occupancy                 gauge      running / max_batch_size
    nanochat_serve_kv_cache_usage                  gauge      KV-cache tokens held / capacity
    nanochat_serve_prefix_cache_hit_tokens_total   counter    prompt tokens served from the prefix cache

Every metric has the tag `model` (the served model name, e.g. sft or base:d20). TTFT starts when the request
reaches the replica (after routing; a model load triggered by the request counts, queueing for a batch row
counts). Gauges are refreshed once a second by the replica and zeroed when a model is evicted. Serve's own request
metrics (ray_serve_*) stay on.
"""

from __future__ import annotations

TAGS = ("model",)
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
GAUGES = ("nanochat_serve_running_requests", "nanochat_serve_waiting_requests", "nanochat_serve_batch_occupancy",
          "nanochat_serve_kv_cache_usage")
NAMES = ("nanochat_serve_ttft_seconds", "nanochat_serve_tpot_seconds", "nanochat_serve_output_tokens_total",
         *GAUGES, "nanochat_serve_prefix_cache_hit_tokens_total")


class ServeMetrics:
    """The metrics of one replica (Ray aggregates replicas per node)."""

    def __init__(self):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.ttft = Histogram(NAMES[0], "time to first token (s), from arrival at the replica",
                              boundaries=TTFT_BUCKETS, tag_keys=TAGS)
        self.tpot = Histogram(NAMES[1], "time per output token after the first (s)", boundaries=TPOT_BUCKETS,
                              tag_keys=TAGS)
        self.tokens = Counter(NAMES[2], "generated tokens", tag_keys=TAGS)
        self.gauges = {name: Gauge(name, desc, tag_keys=TAGS) for name, desc in zip(GAUGES, (
            "requests in the batch", "requests waiting for a batch row", "running / max_batch_size",
            "KV-cache tokens held / capacity"))}
        self.prefix_hits = Counter(NAMES[-1], "prompt tokens served from the prefix cache", tag_keys=TAGS)
        self._prefix_seen: dict[str, int] = {}

    def register(self, model: str):
        """A newly loaded model: its counters start at 0 in the export (rather than appearing at their first
        increment, which for prefix-cache hits may be never). Counter.inc refuses 0, hence the record call."""
        for counter in (self.tokens, self.prefix_hits):
            counter._record(0, tags={"model": model})

    def observe_request(self, model: str, ttft_s: float, tpot_s: float | None):
        tags = {"model": model}
        self.ttft.observe(ttft_s, tags=tags)
        if tpot_s is not None:
            self.tpot.observe(tpot_s, tags=tags)

    def add_tokens(self, model: str, n: int):
        if n > 0:
            self.tokens.inc(n, tags={"model": model})

    def publish(self, model: str, snap: dict):
        """Gauges (and the prefix-cache counter) from a BatchScheduler.snapshot()."""
        tags = {"model": model}
        capacity = snap.get("kv_tokens_capacity") or 0
        values = (snap["running"], snap["waiting"], snap["running"] / max(1, snap["max_batch_size"]),
                  snap.get("kv_tokens_used", 0) / capacity if capacity else 0.0)
        for name, value in zip(GAUGES, values):
            self.gauges[name].set(value, tags=tags)
        hits = int(snap.get("prefix_cache_hit_tokens", 0))
        delta = hits - self._prefix_seen.get(model, 0)
        self._prefix_seen[model] = hits
        if delta > 0:
            self.prefix_hits.inc(delta, tags=tags)

    def clear(self, model: str):
        """An evicted model: its gauges go to 0 (a gauge would otherwise keep its last value)."""
        for gauge in self.gauges.values():
            gauge.set(0, tags={"model": model})
        self._prefix_seen.pop(model, None)
