"""specserve's metrics, exported through Ray's metrics agent (Prometheus).

Names use the engine's terms: draft tokens (proposed), accepted tokens (kept by the
verifier), drafter weight version, draft round trip (network + queues, drafting excluded).
"""

from __future__ import annotations

import time

from ray.util import metrics

LATENCY_BOUNDARIES = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60]
RTT_BOUNDARIES = [0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class VerifierMetrics:
    """Everything a verifier replica records."""

    def __init__(self):
        self.requests = metrics.Counter("specserve_requests_total", "Finished Generate calls by status.",
                                        tag_keys=("status",))
        self.ttft = metrics.Histogram("specserve_ttft_seconds", "Time to first token.", LATENCY_BOUNDARIES)
        self.itl = metrics.Histogram("specserve_inter_token_seconds", "Time between streamed chunks, per token.",
                                     LATENCY_BOUNDARIES)
        self.e2e = metrics.Histogram("specserve_e2e_seconds", "Request latency, first byte in to last out.",
                                     LATENCY_BOUNDARIES)
        self.generated = metrics.Counter("specserve_generated_tokens_total", "Tokens streamed to clients.")
        self.steps = metrics.Counter("specserve_verify_steps_total", "Verification steps (batched forwards).")
        self.draft_tokens = metrics.Counter("specserve_draft_tokens_total", "Draft tokens verified.",
                                            tag_keys=("drafter_version",))
        self.accepted_tokens = metrics.Counter("specserve_accepted_tokens_total", "Draft tokens accepted.",
                                               tag_keys=("drafter_version",))
        self.accepted_at = metrics.Counter("specserve_accepted_by_position_total",
                                           "Accepted draft tokens by position in the block (1 = first).",
                                           tag_keys=("position",))
        self.batch_size = metrics.Histogram("specserve_verifier_batch_size", "Sequences per verification step.",
                                            BATCH_BOUNDARIES)
        self.rtt = metrics.Histogram("specserve_draft_round_trip_seconds",
                                     "Draft round trip minus drafting time (network and queues).", RTT_BOUNDARIES)
        self.drafter_pool_size = metrics.Gauge("specserve_drafter_pool_size", "Drafter replicas registered.")

    def on_step(self, report) -> None:
        self.steps.inc()
        self.batch_size.observe(report.batch_size)
        for version, (drafted, accepted, _) in report.by_version.items():
            tags = {"drafter_version": version or "none"}
            if drafted:
                self.draft_tokens.inc(drafted, tags)
            if accepted:
                self.accepted_tokens.inc(accepted, tags)
        for i, n in enumerate(report.accepted_per_position):
            if n:
                self.accepted_at.inc(n, {"position": str(i + 1)})

    def observe_overheads(self, pool) -> None:
        """Record the draft round trips the pool measured since the last call."""
        for seconds in pool.take_overheads():
            self.rtt.observe(seconds)

    def request_timer(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """TTFT, inter-token and end-to-end latency of one request."""

    def __init__(self, m: VerifierMetrics):
        self.m = m
        self.start = self.last = time.perf_counter()
        self.first = True

    def tokens(self, n: int) -> None:
        now = time.perf_counter()
        if n and self.first:
            self.m.ttft.observe(now - self.start)
            self.first = False
        elif n:
            self.m.itl.observe((now - self.last) / n)
        self.last = now
        self.m.generated.inc(n) if n else None

    def done(self, status: str) -> None:
        self.m.requests.inc(1, {"status": status})
        self.m.e2e.observe(time.perf_counter() - self.start)


class DrafterMetrics:
    """What a drafter replica records."""

    def __init__(self):
        self.sequences = metrics.Gauge("specserve_drafter_sequences", "Sequences a drafter replica holds.")
        self.drafts = metrics.Counter("specserve_drafter_drafts_total", "Drafts sent by a drafter replica.")
        self.swaps = metrics.Counter("specserve_drafter_weight_swaps_total", "Hot swaps of drafter weights.")
