"""Adaptive draft length: how many tokens to draft for a sequence this step.

With acceptance rate a1 for a block's first draft and a2 for each later one (given the one
before it was accepted), a block of k drafts yields on average
    E(k) = 1 + a1 * (1 - a2^k) / (1 - a2)
tokens (accepted drafts plus the recovered/bonus token; with a1 = a2 = alpha this is the
familiar (1 - alpha^(k+1)) / (1 - alpha)) and costs
    T(k) = k * t_draft + t_verify(k + 1) + t_rtt
seconds. The policy picks the k in [0, k_max] that maximises E(k) / T(k); k = 0 is plain
decoding, so speculation switches itself off for a sequence whose drafts do not pay. The times
are measured as the engine runs (`CostModel`); alpha is tracked per sequence. While a sequence
is not drafting its alpha drifts back toward the prior, so it is retried now and then; while no
sequence drafts, one token is drafted now and then (a probe, at growing intervals) to re-measure
the costs.
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass

FIXED_K_MAX = 32  # the longest fixed draft length a config or the CLI may ask for
RTT_WINDOW = 9  # round-trip samples the estimate is the median of (per batch bucket)
PROMPT_LOOKUP = 1  # default: draft by prompt lookup after any repeated token (on the demo pair it beats the drafter there)


@dataclass(frozen=True)
class DraftLengthConfig:
    """Knobs of the policy; the defaults need no tuning."""

    k_max: int = 8  # longest draft block
    alpha_prior: float = 0.7  # acceptance assumed before any block was verified (then: the pooled rate, see AcceptanceTracker)
    alpha_ema: float = 0.1  # decay of the accept counts per verified block
    time_ema: float = 0.1  # weight of the latest measurement in the cost model
    recovery: float = 0.1  # per-step decay of an idle sequence's counts (alpha drifts to the prior)
    fixed_k: int | None = None  # draft exactly this many every step (no cost model): for tests/studies
    probe_every: int = 32  # after this many steps without drafting, draft one token to re-measure its cost
    probe_max: int = 256  # each probe that leaves drafting off doubles the wait, up to this many steps
    tree_nodes: int = 0  # > 0: ask for token trees of up to this many drafts (depth = the chosen k); 0 = chains
    min_gain: float = 0.05  # drafting must promise this much more than plain steps: the timings are noisy

    def __post_init__(self):
        if not 1 <= self.probe_every <= self.probe_max:
            raise ValueError(f"need 1 <= probe_every <= probe_max, got {self.probe_every} and {self.probe_max}")
        if not 0 <= self.tree_nodes <= 63:
            raise ValueError(f"tree_nodes must be in [0, 63], got {self.tree_nodes}")

    @property
    def block_max(self) -> int:
        """The most draft tokens one verification block can hold."""
        return max(self.k_max, self.tree_nodes, self.fixed_k or 0)


class CostModel:
    """Measured draft step time, verify time per block size, and draft round-trip time.

    Every measurement is kept per batch-size bucket (1, 2, 4, 8, ...): a longer block costs
    little extra in a small batch, where the forward is bound by weight reads, and nearly its
    full share in a big one, where it is bound by compute; a drafter forward and a round trip
    for many sequences cost more than for one. So speculation turns itself down as the
    verifier's batch fills up.

    A bucket's first steps borrow from the nearest smaller bucket measured: a block size not
    measured yet costs this bucket's nearest measured size times the ratio between the two
    sizes there (longer blocks only get relatively dearer as the batch grows), and the draft
    step and round trip take that bucket's times (a lower bound). With nothing smaller to go
    by, an unmeasured size costs what the nearest measured one costs: deliberately optimistic,
    so that the policy tries longer blocks and measures them instead of ruling them out.
    Until a bucket has timed a step without drafts, the policy does not draft in it.
    """

    def __init__(self, cfg: DraftLengthConfig, rtt_s: float = 0.0):
        self.cfg = cfg
        self._rtt_default = rtt_s
        self._verify_by_bucket: dict[int, dict[int, float]] = {}
        self._draft_by_bucket: dict[int, float] = {}
        self._remote_draft_by_bucket: dict[int, float] = {}  # the remote drafter's samples only
        self._rtt_by_bucket: dict[int, float] = {}
        self._rtt_samples: dict[int, collections.deque] = {}  # the latest RTT_WINDOW round trips per bucket
        self._samples: dict[tuple, int] = {}  # measurements taken of each quantity (see _ema)
        self._bucket = 1

    def use_batch(self, batch: int) -> None:
        """The following estimates and measurements are for steps of `batch` sequences."""
        self._bucket = 1 << max(0, batch - 1).bit_length()

    @property
    def verify_s(self) -> dict[int, float]:
        """Measured verify time per block size, for the current batch bucket."""
        return self._verify_by_bucket.setdefault(self._bucket, {})

    @staticmethod
    def _nearest_below(buckets, bucket: int) -> int | None:
        smaller = [b for b in buckets if b < bucket]
        return max(smaller) if smaller else None

    def _borrowed(self, table: dict[int, float], default: float | None) -> float | None:
        """This bucket's value of `table`, else the nearest smaller bucket's, else the nearest larger's."""
        if self._bucket in table:
            return table[self._bucket]
        below = self._nearest_below(table, self._bucket)
        if below is not None:
            return table[below]
        return table[min(table)] if table else default

    @property
    def draft_step_s(self) -> float | None:
        """Seconds of drafting per draft token asked for at the current batch (None: never
        measured): a model drafter's forward, less where its drafts come from prompt lookup."""
        return self._borrowed(self._draft_by_bucket, None)

    @property
    def remote_draft_step_s(self) -> float | None:
        """Seconds of a remote drafter's own drafting per draft token asked of it, at the current
        batch (None: never measured); `draft_step_s` also averages in drafts made locally."""
        return self._borrowed(self._remote_draft_by_bucket, None)

    @property
    def rtt_s(self) -> float:
        """Seconds a remote draft round trip adds beyond drafting, at the current batch."""
        return self._borrowed(self._rtt_by_bucket, self._rtt_default)

    def _ema(self, key: tuple, old: float | None, new: float) -> float:
        """The mean of a quantity's first samples, then a moving average (weight time_ema).

        A plain moving average started at its first sample keeps an unlucky first measurement
        for many steps, and the policy may never measure that size again if it looked dear
        (on a CPU a block size's first forward pays the one-off setup of its matrix products).
        """
        count = self._samples.get(key, 0) + 1
        self._samples[key] = count
        return new if old is None else old + max(self.cfg.time_ema, 1.0 / count) * (new - old)

    def observe_draft(self, tokens: int, seconds: float, remote: bool = False) -> None:
        """A drafting call that asked for `tokens` draft tokens took `seconds` (`remote`: a remote
        drafter's own time for its drafts)."""
        if tokens > 0:
            b = self._bucket
            self._draft_by_bucket[b] = self._ema(("draft", b), self._draft_by_bucket.get(b), seconds / tokens)
            if remote:
                self._remote_draft_by_bucket[b] = self._ema(("remote draft", b), self._remote_draft_by_bucket.get(b),
                                                            seconds / tokens)

    def observe_rtt(self, seconds: float) -> None:
        """A remote drafter's round trip (waiting time minus its drafting time) took `seconds`.

        The estimate is the median of the bucket's last RTT_WINDOW samples: round trips on a
        busy machine have a long tail, and one sample from its far end (tens of ms against a
        median of two) must not price drafting out of a bucket where it is then not measured
        again for a long while."""
        samples = self._rtt_samples.setdefault(self._bucket, collections.deque(maxlen=RTT_WINDOW))
        samples.append(max(0.0, seconds))
        self._rtt_by_bucket[self._bucket] = statistics.median(samples)

    def observe_verify(self, n: int, seconds: float) -> None:
        """A verification forward with blocks of `n` positions took `seconds`."""
        self.verify_s[n] = self._ema(("verify", self._bucket, n), self.verify_s.get(n), seconds)

    def knows_plain(self) -> bool:
        """Whether a step without drafts has been timed at the current batch."""
        return 1 in self.verify_s

    def longest_measured(self) -> int:
        """The longest block (positions) timed at the current batch (0: none)."""
        return max(self.verify_s, default=0)

    def verify_time(self, n: int) -> float:
        """Estimated verify time for blocks of n positions at the current batch.

        Between measured sizes: linear interpolation. Outside them: see the class docstring.
        """
        return self._verify_time(self._bucket, n)

    def _verify_time(self, bucket: int, n: int) -> float:
        times = self._envelope(self._verify_by_bucket.get(bucket, {}))
        if n in times:
            return times[n]
        known = sorted(times)
        if not known:
            return 1.0
        if n < known[0] or n > known[-1]:
            near = known[0] if n < known[0] else known[-1]
            below = self._nearest_below([b for b, t in self._verify_by_bucket.items() if t], bucket)
            if below is None:
                return times[near]
            ratio = self._verify_time(below, n) / self._verify_time(below, near)
            return times[near] * (max(ratio, 1.0) if n > near else min(ratio, 1.0))
        lo = max(m for m in known if m < n)
        hi = min(m for m in known if m > n)
        w = (n - lo) / (hi - lo)
        return (1 - w) * times[lo] + w * times[hi]

    @staticmethod
    def _envelope(times: dict[int, float]) -> dict[int, float]:
        """The measured times made non-decreasing in the block size: a size costs no more than
        any larger size measured. A block never gets cheaper as it grows, but single
        measurements are noisy, and a size the policy stopped choosing keeps its last (maybe
        unlucky) estimate for good; without this, one slow step of 4 positions could keep
        blocks of 3 and 4 off while 6 looked cheap."""
        out, low = {}, float("inf")
        for n in sorted(times, reverse=True):
            low = min(low, times[n])
            out[n] = low
        return out

    def step_time(self, k: int, local: bool = False) -> float:
        """T(k): seconds for one step drafting k tokens (`local`: drafts that cost no drafting
        time and no round trip, a remote pool's own lookups: the verify step alone)."""
        if k == 0:
            return self.verify_time(1)
        if local:
            return self.verify_time(k + 1)
        return k * (self.draft_step_s or 0.0) + self.verify_time(k + 1) + self.rtt_s


Rates = "float | tuple[float, float]"  # alpha, or (first, later): see AcceptanceTracker.rates


def expected_tokens(alpha: Rates, k: int) -> float:
    """E(k): mean tokens emitted by a step with k drafts at acceptance `alpha`: one rate for
    every draft, or (first, later) for the block's first draft and each one after it."""
    first, later = alpha if isinstance(alpha, tuple) else (alpha, alpha)
    if k <= 0:
        return 1.0
    if later >= 1.0:
        return 1.0 + first * k
    return 1.0 + first * (1.0 - later ** k) / (1.0 - later)


def best_draft_length(alpha: Rates | list[Rates], cost: CostModel, k_max: int, local: bool = False) -> int:
    """The k in [0, k_max] with the most expected tokens per second (`local`: drafts that need
    no drafter and no round trip, see CostModel.step_time).

    For a batch (a list of per-sequence rates) the step time is shared: every row pays for the
    longest block, so k maximises the batch's expected tokens sum_i E(alpha_i, k) / T(k).
    Blocks are tried one size at a time: the answer is at most one draft longer than the
    longest block timed at this batch, so a guess about an untimed size costs at most one step
    of one more position (in a full batch, a step of 9 positions can cost several plain
    steps). The best k is looked for over every length, though, and climbed toward: when one
    draft does not pay but several would (on a verifier where 2 and 5 positions cost about the
    same, a drafter whose later drafts are more often right than its first), the policy still
    steps up to them. Drafting that promises less than `min_gain` over plain steps is not
    chosen: verify times measured on a busy machine scatter by 10-15%, and a break-even guess
    loses as often as it wins.
    """
    if not cost.knows_plain():
        return 0  # time a step without drafts first: what drafting must beat
    alphas = alpha if isinstance(alpha, list) else [alpha]
    rates = [sum(expected_tokens(a, k) for a in alphas) / cost.step_time(k, local) for k in range(k_max + 1)]
    best = max(range(k_max + 1), key=rates.__getitem__)
    if rates[best] < rates[0] * (1.0 + cost.cfg.min_gain):
        return 0  # within the noise of the estimates: not worth the risk of losing to plain steps
    return min(best, cost.longest_measured())


class AcceptanceTracker:
    """alpha of one sequence, estimated from per-token accept trials.

    A block of d drafts with m accepted shows m successes and, when m < d, one failure; the
    drafts after the first rejection were never tested and say nothing. Counts decay by
    `1 - alpha_ema` per block so alpha follows the sequence, with `prior_weight` pseudo-trials
    at the prior. A step that asked for drafts and got none (the drafter's confidence stop, or
    a late remote draft) counts as one failed trial: it paid for drafting and gained nothing.
    Steps with speculation off leave the counts alone, except that they decay toward the prior
    so that speculation is retried.

    The engine keeps one more tracker fed by every sequence's blocks (with a slower decay) and
    makes it each sequence's prior: a new sequence starts from what this drafter's tokens have
    recently achieved with this target, not from a fixed guess (`alpha_prior` is where the
    pooled tracker itself starts). A drafter that got better (a hot swap) shows in it within
    some tens of verified blocks, probes included.
    """

    def __init__(self, cfg: DraftLengthConfig, prior_weight: float = 2.0, prior: "AcceptanceTracker | None" = None,
                 ema: float | None = None):
        self.cfg = cfg
        self.prior_weight = prior_weight
        self.prior = prior  # where the prior comes from (the engine's pooled tracker); None: cfg.alpha_prior
        self.ema = cfg.alpha_ema if ema is None else ema
        self.successes = 0.0  # every draft tested
        self.trials = 0.0
        self.first_successes = 0.0  # the blocks' first drafts only
        self.first_trials = 0.0

    def _rate(self, successes: float, trials: float, prior: float) -> float:
        return (successes + prior * self.prior_weight) / (trials + self.prior_weight)

    @property
    def alpha(self) -> float:
        """Current estimate of the per-token acceptance rate (every tested draft alike)."""
        prior = self.cfg.alpha_prior if self.prior is None else self.prior.alpha
        return self._rate(self.successes, self.trials, prior)

    @property
    def rates(self) -> tuple[float, float]:
        """(first, later): the estimated acceptance of a block's first draft, and of each draft
        after an accepted one. They differ a lot: the demo drafter's first draft was accepted
        86% of the time and each later one 53% (fixed k = 4 over the 8 held-out prompts of
        `specserve bench`), where one rate for both (0.67) prices a one-draft block too
        low and long blocks too high."""
        prior = (self.cfg.alpha_prior,) * 2 if self.prior is None else self.prior.rates
        later_s, later_t = self.successes - self.first_successes, self.trials - self.first_trials
        return (self._rate(self.first_successes, self.first_trials, prior[0]),
                self._rate(max(0.0, later_s), max(0.0, later_t), prior[1]))

    def _decay(self, keep: float) -> None:
        self.successes, self.trials = keep * self.successes, keep * self.trials
        self.first_successes, self.first_trials = keep * self.first_successes, keep * self.first_trials

    def observe(self, drafted: int, accepted: int, speculation_off: bool = False) -> None:
        """Fold in one verified block of `drafted` tokens of which `accepted` were kept."""
        if drafted == 0:
            if speculation_off:
                self._decay(1 - self.cfg.recovery)
            else:  # asked for drafts, got none: a failed first trial
                self._decay(1 - self.ema)
                self.trials += 1
                self.first_trials += 1
            return
        self._decay(1 - self.ema)
        self.successes += accepted
        self.trials += accepted + (1 if accepted < drafted else 0)
        self.first_successes += 1 if accepted else 0
        self.first_trials += 1
