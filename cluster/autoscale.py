"""Serve autoscaling policy of the drafter pool, driven by drafter load.

Drafters receive no Serve requests (verifiers stream to them directly), so Serve's default
signal, ongoing requests, is always zero. Each drafter replica reports the sequences it
drafts for (`record_autoscaling_stats`), and this policy asks for enough replicas that each
carries about `target_sequences_per_replica`. Serve applies its own bounds, delays and
smoothing around it.
"""

from __future__ import annotations

import math


class DrafterPolicy:
    """desired replicas = ceil(total live sequences / target per replica), within the bounds."""

    def __init__(self, target_sequences_per_replica: float = 8.0):
        self.target = target_sequences_per_replica

    def __call__(self, ctx) -> tuple[int, dict]:
        per_replica = (ctx.aggregated_metrics or {}).get("sequences", {})
        if not per_replica:  # no reports yet: keep what we have
            return ctx.target_num_replicas, {}
        desired = math.ceil(sum(per_replica.values()) / self.target)
        desired = max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, desired))
        return desired, {}
