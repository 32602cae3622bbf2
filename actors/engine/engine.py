"""The speculative decoding loop of one verifier: draft, verify in one batched forward, commit.

Each sequence keeps the target's KV cache one token behind: the last emitted token is
`pending`. A step runs the target over [pending, d_1 .. d_k] for every active sequence at once,
verifies the drafts (kernels.verify), rolls each cache back to what was accepted, and emits the
accepted drafts plus one recovered/bonus token, cut at the first stop condition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specserve.actors.engine.draft_length import (
    AcceptanceTracker, CostModel, DraftLengthConfig, best_draft_length, expected_tokens,
)
from specserve.actors.engine.drafters import BaseDrafter, Draft, DraftRequest
from specserve.actors.engine.request import (
    GenerationResult, InvalidRequestError, SamplingParams, SpecStats,
)
from specserve.actors.engine.runner import ModelRunner
from specserve.actors.engine.stops import StopChecker
from specserve.actors.engine.tap import TrafficTap, make_record, top_k_rows
from specserve.actors.engine import randomness
from specserve.kernels import dispatch
from specserve.kernels.dispatch import Backend
from specserve.kernels.sampling import sampling_probs
from specserve.kernels.tree import tree_depth, tree_mask
from specserve.kernels.verify import verify_greedy


PROBE_RETRIES = 8  # a probe that measured nothing is retried on the next step at most this many times in a row
POOLED_EMA = 0.02  # decay of the pooled acceptance counts per verified block (~50 blocks of memory)


@dataclass
class Sequence:
    """A request being decoded."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    slot: int
    pending: int
    seed: int  # keys every random number this request uses (see randomness.py)
    stops: StopChecker
    tracker: AcceptanceTracker
    generated: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    empty: int = 0  # steps that asked the drafter for tokens and got none (its confidence stop, a late draft)
    finish_reason: str | None = None

    def stats(self) -> SpecStats:
        return SpecStats(self.drafted, self.accepted, self.steps)


@dataclass
class Timing:
    """Wall time the engine spent drafting and verifying, for benchmarks and the cost model."""

    draft_s: float = 0.0  # in the drafter's propose (a remote drafter: waiting for its answers)
    draft_forwards: int = 0
    draft_steps: int = 0  # steps that asked the drafter for tokens
    probes: int = 0  # of those, probes (see _draft_lengths)
    verify_s: float = 0.0
    verify_steps: int = 0


@dataclass
class StepOutput:
    """Tokens a sequence gained in one step, and its finish reason once done."""

    seq_id: int
    new_tokens: list[int]
    finish_reason: str | None


class SpeculativeEngine:
    """Continuous batching of speculative decoding over one target model."""

    def __init__(self, target: ModelRunner, tokenizer, drafter: BaseDrafter | None = None,
                 policy: DraftLengthConfig = DraftLengthConfig(), rtt_s: float = 0.0, kernels: Backend = "auto",
                 tap: TrafficTap | None = None):
        self.target = target
        self.tap = tap  # records verified blocks for online distillation (tap.py); None or disabled: nothing
        self.kernels = kernels  # which implementation of the verification kernels (kernels/dispatch.py)
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.policy = policy
        self.cost = CostModel(policy, rtt_s)
        self.eos_ids = _eos_ids(target.model, tokenizer)
        self.seqs: dict[int, Sequence] = {}
        self.timing = Timing()
        self._next_id = 0
        self._off_steps = 0  # consecutive steps in which no sequence drafted
        # acceptance over every sequence's blocks: the prior of each new sequence's tracker
        self.pooled = AcceptanceTracker(policy, ema=POOLED_EMA)
        self._probe_interval = policy.probe_every  # off steps before the next probe (doubles, see below)
        self._probing = False  # this step's drafts are a probe
        self._local_only = False  # this step drafts only what a remote pool drafts itself (_draft_lengths)
        self._probe_retries = 0  # probes in a row that measured nothing (see _probed)
        if drafter is not None:  # the cost model should time blocks, not their first-call setup
            target.warm_up(policy.block_max + 1)

    # -- admission -------------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError naming the field that makes this request impossible."""
        if not prompt_ids:
            raise InvalidRequestError("prompt", "the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise InvalidRequestError("prompt_token_ids", f"token id {bad[0]} outside [0, {self.target.vocab_size})")
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise InvalidRequestError("stop_token_ids", f"token id {bad[0]} outside [0, {self.target.vocab_size})")
        limit = self.target.cfg.max_seq_len - self.policy.block_max - 1
        if len(prompt_ids) + params.max_tokens > limit:
            raise InvalidRequestError(
                "max_tokens", f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds {limit}"
            )

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Validate, prefill the prompt into the target cache, start the drafter; returns the id."""
        self.validate(prompt_ids, params)
        slot = self.target.add_sequence()
        seq_id, self._next_id = self._next_id, self._next_id + 1
        seed = params.seed if params.seed is not None else randomness.fresh_seed()
        if len(prompt_ids) > 1:
            self.target.forward([slot], torch.tensor([prompt_ids[:-1]]), logits_to_keep=1)
        self.seqs[seq_id] = Sequence(
            seq_id, list(prompt_ids), params, slot, prompt_ids[-1], seed,
            StopChecker(self.tokenizer, params, self.eos_ids), AcceptanceTracker(self.policy, prior=self.pooled),
        )
        if self.drafter is not None:
            self.drafter.start(seq_id, prompt_ids, params)
        return seq_id

    def release(self, seq_id: int) -> None:
        """Free a sequence's cache slot and drafter state (finished or cancelled)."""
        seq = self.seqs.pop(seq_id)
        self.target.free(seq.slot)
        if self.drafter is not None:
            if seq.finish_reason:  # the last step's tokens had no verdict: the drafter learns them here
                self.drafter.finished(seq_id, seq.prompt_ids + seq.generated)
            self.drafter.stop(seq_id)

    # -- one step --------------------------------------------------------------------------------

    def _draft_lengths(self, seqs: list[Sequence]) -> list[int]:
        if self.drafter is None:
            return [0] * len(seqs)
        timed = [s for s in seqs if not s.params.seeded_sampling]
        # one k for the batch: a longer block in one row makes the whole verify forward longer
        rates = [s.tracker.rates for s in timed]
        batch_k = best_draft_length(rates, self.cost, self.policy.k_max) if timed else 0
        self._local_only = False
        if not batch_k and timed and self.drafter.drafts_locally and self.policy.fixed_k is None:
            # a remote drafter does not pay at this batch, but a remote pool's own drafts (suffix
            # lookups, pushed drafts) cost no drafter time and no round trip: those may still pay
            batch_k = best_draft_length(rates, self.cost, self.policy.k_max, local=True)
            self._local_only = batch_k > 0
        ks = []
        for s in seqs:
            k = self.policy.fixed_k
            if k is None and s.params.seeded_sampling:
                # timings must not steer a seeded request: its output would vary run to run
                k = self.policy.k_max
            if k is None:
                k = batch_k
            ks.append(min(k, s.params.max_tokens - len(s.generated) - 1))
        # speculation off everywhere for a while: draft one token once, to re-measure its cost
        # (once per batch, not per sequence: any draft makes the whole batch wait for it). Each
        # probe that leaves speculation off doubles the wait before the next (up to probe_max),
        # so where drafting does not pay, probing costs next to nothing; drafting that pays
        # again brings the interval back to probe_every. Steps with local drafts only count as
        # off: the remote drafter's costs are what a probe re-measures.
        if any(ks) and not self._local_only:
            self._off_steps, self._probe_interval = 0, self.policy.probe_every
        else:
            self._off_steps += 1
        self._probing = self._off_steps >= self._probe_interval
        if self._probing:
            self._local_only = False
            ks = [min(1, s.params.max_tokens - len(s.generated) - 1) for s in seqs]
        return ks

    def _probed(self, reqs: list[DraftRequest], drafts: list[Draft], local: dict[int, Draft]) -> None:
        """After a probe: the next one waits twice as long (up to probe_max), unless it measured
        nothing: nothing was drafted at all (a remote drafter still prefilling every sequence
        it was just given, or none reachable), or a remote drafter was asked and none of its
        drafts came back as a round-trip sample (the sequences without a lookup draft were all
        just attached, or their drafter first caught up on the steps it sat out).
        Then the next step probes again, at most PROBE_RETRIES times in a row: otherwise the
        round trip a probe exists to re-measure would keep its old, maybe unlucky, estimate, and
        drafting (lookup drafts included) would stay off for the whole request."""
        remote_asked = any(r.k > 0 and r.seq_id not in local for r in reqs)
        timed = any(d.seconds is not None and not d.catch_up for d in drafts)  # a round-trip sample (_draft)
        measured = any(d.requested for d in drafts) and not (self.drafter.remote and remote_asked and not timed)
        if not measured and self._probe_retries < PROBE_RETRIES:
            self._probe_retries += 1
            return
        self._probe_retries = 0
        self.timing.probes += 1
        self._off_steps = 0
        self._probe_interval = min(2 * self._probe_interval, self.policy.probe_max)

    def _tree_nodes(self, seq: Sequence, k: int) -> int:
        """Tree budget for a sequence drafting k deep (0: a chain); never more tokens than its
        remaining max_tokens, like a chain's k."""
        if not k or not self.policy.tree_nodes:
            return 0
        return min(max(k, self.policy.tree_nodes), seq.params.max_tokens - len(seq.generated) - 1)

    def _draft(self, seqs: list[Sequence]) -> list[Draft]:
        ks = self._draft_lengths(seqs)
        if self.drafter is None or not any(ks):
            return [Draft([]) for _ in seqs]
        t0 = time.perf_counter()
        reqs = [DraftRequest(s.seq_id, k, self._tree_nodes(s, k)) for s, k in zip(seqs, ks)]
        local = self.drafter.local_drafts(reqs)
        if self._local_only:  # seeded requests draft regardless of timings (_draft_lengths)
            reqs = [r if r.seq_id in local or s.params.seeded_sampling else DraftRequest(r.seq_id, 0)
                    for r, s in zip(reqs, seqs)]
        elif local and not self._remote_pays(seqs, ks, local):
            reqs = [r if r.seq_id in local else DraftRequest(r.seq_id, 0) for r in reqs]
        drafts = self.drafter.propose(reqs)
        if self._probing:
            self._probed(reqs, drafts, local)
        elapsed, forwards = time.perf_counter() - t0, max(d.forwards for d in drafts)
        # the cost model prices a draft token asked for: a model drafter's forward, or nothing
        # where its drafts came from prompt lookup
        asked = max(d.requested for d in drafts)
        remote = [d.seconds for d in drafts if d.seconds is not None]
        if any(d.catch_up for d in drafts):
            pass  # the drafter fed what it missed while speculation was off: not a draft step's cost
        elif remote:  # a remote drafter: its own drafting time, and the rest is the round trip
            if not any(d.fed_missed for d in drafts):
                self.cost.observe_draft(asked, max(remote), remote=True)
            self.cost.observe_rtt(elapsed - max(remote))
        elif not self.drafter.remote or all(d.tokens for d in drafts if d.requested):
            # drafted here (a remote pool's lookups included), not a remote draft that came late
            self.cost.observe_draft(asked, elapsed)
        self.timing.draft_s += elapsed
        self.timing.draft_forwards += forwards
        self.timing.draft_steps += 1
        return drafts

    def _remote_pays(self, seqs: list[Sequence], ks: list[int], local: dict[int, Draft]) -> bool:
        """Whether the batch should wait for a remote drafter's drafts of the sequences that
        `local` (drafts made without a round trip: prompt lookup) leaves without one.

        Compares the batch's expected tokens per second with those drafts (the round trip and
        the drafter's time on top of the verify step) and without them (those sequences take a
        plain step inside the same verify forward)."""
        k = max(ks)
        rest = [s for s, n in zip(seqs, ks) if n > 0 and s.seq_id not in local]
        if not rest or self._probing or any(s.params.seeded_sampling for s in rest):
            return True  # a probe measures the drafter; seeded requests must not depend on timings
        have = sum(expected_tokens(s.tracker.rates, len(local[s.seq_id].tokens)) if s.seq_id in local else 1.0
                   for s in seqs)
        gain = sum(expected_tokens(s.tracker.rates, k) - 1.0 for s in rest)
        longest_local = max(len(d.tokens) for d in local.values())
        draft_s = self.cost.remote_draft_step_s or 0.0
        with_them = self.cost.verify_time(k + 1) + self.cost.rtt_s + k * draft_s
        without = have / self.cost.verify_time(longest_local + 1)
        return (have + gain) / with_them > without * (1.0 + self.policy.min_gain)  # min_gain: noisy timings

    def step(self) -> list[StepOutput]:
        """Draft, verify and commit one block for every active sequence."""
        seqs = list(self.seqs.values())
        if not seqs:
            return []
        self.cost.use_batch(len(seqs))
        drafts = self._draft(seqs)
        block = VerifyBlock.of([s.pending for s in seqs], drafts)
        lengths = [self.target.length(s.slot) for s in seqs]
        t0 = time.perf_counter()
        mask = None if block.parents is None else tree_mask(block.parents)
        depth = None if block.parents is None else tree_depth(block.parents)
        logits = self.target.forward([s.slot for s in seqs], block.tokens, block.n_valid, mask, depth)  # [batch, n, vocab]
        path, num_acc, next_tok = self._verify(seqs, drafts, block, logits)
        accepted = num_acc.tolist()
        if self.tap is not None and self.tap.cfg.enabled:
            self._record(seqs, drafts, logits, accepted)
        if path is not None:
            self._compact(seqs, lengths, path, num_acc)
        elapsed = time.perf_counter() - t0
        self.cost.observe_verify(block.tokens.shape[1], elapsed)
        self.timing.verify_s += elapsed
        self.timing.verify_steps += 1
        paths = [None] * len(seqs) if path is None else [[i - 1 for i in row[1 : 1 + a]]
                                                        for row, a in zip(path.tolist(), accepted)]
        return [self._commit(s, d, length, a, t, pa) for s, d, length, a, t, pa in
                zip(seqs, drafts, lengths, accepted, next_tok.tolist(), paths)]

    def _verify(self, seqs: list[Sequence], drafts: list[Draft], block: "VerifyBlock", logits: torch.Tensor):
        """(path [batch, n] or None for chains, num_accepted [batch], next_token [batch])."""
        dev = logits.device
        target_argmax = logits.argmax(dim=-1)  # [batch, n]
        tokens = block.tokens.to(dev)
        greedy = torch.tensor([s.params.greedy for s in seqs], device=dev)
        draft_len = torch.tensor([len(d.tokens) for d in drafts], device=dev)
        if bool(greedy.all()) and block.parents is None:
            return (None, *verify_greedy(target_argmax, tokens[:, 1:], draft_len))
        p, q_ids, q_probs, uniforms, noise = self._sampling_inputs(seqs, drafts, block, logits, greedy)
        if block.parents is None:
            num_acc, next_tok = dispatch.verify_chain(tokens[:, 1:], draft_len, target_argmax, p, q_ids[:, 1:],
                                                      q_probs[:, 1:], greedy, uniforms[:, 1:], noise,
                                                      backend=self.kernels)
            return None, num_acc, next_tok
        path, num_acc, next_tok = dispatch.verify_tree(tokens, block.parents.to(dev), target_argmax, p, q_ids, q_probs,
                                                       greedy, uniforms, noise, backend=self.kernels)
        return path.cpu(), num_acc, next_tok

    def _sampling_inputs(self, seqs, drafts, block, logits, greedy):
        """p, sparse q, uniforms and noise per block position (zeros in greedy rows)."""
        batch, n, vocab = logits.shape
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        p = torch.zeros(batch, n, vocab, device=logits.device)
        if sampled:
            rows = [seqs[i].params for i in sampled]
            def per_row(values, dtype):
                return torch.tensor(values, dtype=dtype, device=logits.device).unsqueeze(1).expand(len(sampled), n)
            p[sampled] = sampling_probs(logits[sampled], per_row([r.temperature for r in rows], torch.float32),
                                        per_row([r.top_k for r in rows], torch.long),
                                        per_row([r.top_p for r in rows], torch.float64))
        m = max([d.q_ids.shape[1] for d in drafts if d.q_ids is not None and d.tokens] or [1])
        q_ids = torch.zeros(batch, n, m, dtype=torch.long)
        q_probs = torch.zeros(batch, n, m)
        uniforms = torch.zeros(batch, n)
        noise = torch.ones(batch, vocab)
        for i in sampled:
            s, d = seqs[i], drafts[i]
            if d.tokens and d.q_ids is not None:
                q_ids[i, 1 : 1 + len(d.tokens), : d.q_ids.shape[1]] = d.q_ids
                q_probs[i, 1 : 1 + len(d.tokens), : d.q_probs.shape[1]] = d.q_probs
            start = len(s.generated)  # output position of the step's first new token
            if block.parents is None:
                uniforms[i, 1:] = randomness.uniforms(s.seed, start, n - 1)
            else:
                uniforms[i] = randomness.node_uniforms(s.seed, start, n)
            noise[i] = randomness.exp_noise(s.seed, start, vocab)
        dev = logits.device
        return p, q_ids.to(dev), q_probs.to(dev), uniforms.to(dev), noise.to(dev)

    def _record(self, seqs: list[Sequence], drafts: list[Draft], logits: torch.Tensor, num_acc: list[int]) -> None:
        """Offer the tap this step's verified chain blocks (trees are not recorded).

        A step without a draft is a block too: its one verified position still gives the
        target's distribution of the next token, the teacher signal a drafter that speculation
        has switched off needs to earn its way back.
        """
        rows = [i for i, d in enumerate(drafts) if d.parents is None and self.tap.wants()]
        if not rows:
            return
        ids, probs = top_k_rows(logits[rows], self.tap.cfg.top_k)
        for j, i in enumerate(rows):
            s, d = seqs[i], drafts[i]
            version = self.drafter.version(s.seq_id) if self.drafter is not None else ""
            self.tap.put(make_record(s.prompt_ids + s.generated, d.tokens, ids[j], probs[j], num_acc[i], version,
                                     self.tap.cfg.max_context))

    def _compact(self, seqs: list[Sequence], lengths: list[int], path: torch.Tensor, num_acc: torch.Tensor) -> None:
        """Move each row's accepted tree path into place in the target cache (chains need nothing)."""
        n = path.shape[1]
        in_place = torch.arange(n).unsqueeze(0) <= num_acc.cpu().unsqueeze(1)  # [batch, n]
        moved = ((path != torch.arange(n)) & in_place).any(dim=1)
        rows = moved.nonzero().flatten().tolist()
        if rows:
            self.target.compact([seqs[i].slot for i in rows], [lengths[i] for i in rows], path[rows])

    def _commit(self, seq: Sequence, draft: Draft, length: int, accepted: int, next_token: int,
                path: list[int] | None) -> StepOutput:
        """Keep pending + accepted drafts in the cache, emit tokens up to the first stop."""
        self.target.truncate(seq.slot, length + 1 + accepted)
        seq.drafted += len(draft.tokens)
        seq.accepted += accepted
        seq.steps += 1
        seq.empty += int(draft.requested > 0 and not draft.tokens)
        tested = _tested(draft, accepted, path)
        seq.tracker.observe(tested, accepted, speculation_off=draft.requested == 0)
        if draft.requested:
            self.pooled.observe(tested, accepted)
        kept = [draft.tokens[i] for i in path] if path is not None else draft.tokens[:accepted]
        emitted = []
        for tok in kept + [next_token]:
            seq.generated.append(tok)
            emitted.append(tok)
            seq.finish_reason = seq.stops.check(seq.generated)
            if seq.finish_reason:
                break
        seq.pending = next_token
        if not seq.finish_reason and self.drafter is not None:
            self.drafter.verdict(seq.seq_id, accepted, next_token, path)
        return StepOutput(seq.seq_id, emitted, seq.finish_reason)

    # -- whole requests --------------------------------------------------------------------------

    def result(self, seq: Sequence, elapsed_s: float = 0.0) -> GenerationResult:
        """The finished request as returned to callers."""
        return GenerationResult(seq.prompt_ids, list(seq.generated), seq.stops.final_text(seq.generated),
                                seq.finish_reason or "length", seq.stats(), elapsed_s)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[GenerationResult]:
        """Run requests to completion with continuous batching; results in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for p, sp in zip(prompts, params_list):
            self.validate(p, sp)
        waiting = list(enumerate(zip(prompts, params_list)))
        ids: dict[int, int] = {}
        results: dict[int, GenerationResult] = {}
        start = time.perf_counter()
        while waiting or self.seqs:
            while waiting and self.target.cache.num_free > 0:
                idx, (p, sp) = waiting.pop(0)
                ids[self.add_request(p, sp)] = idx
            for out in self.step():
                if out.finish_reason and out.seq_id in ids:
                    results[ids[out.seq_id]] = self.result(self.seqs[out.seq_id], time.perf_counter() - start)
                    self.release(out.seq_id)
        return [results[i] for i in range(len(prompts))]


@dataclass
class VerifyBlock:
    """The target's input of one step: [pending, drafts...] per row, right-padded.

    tokens:  [batch, n] int64
    n_valid: real positions per row
    parents: [batch, n] int64 parent block position of each position (-1: root and padding),
             or None when every row is a chain
    """

    tokens: torch.Tensor
    n_valid: list[int]
    parents: torch.Tensor | None

    @staticmethod
    def of(pending: list[int], drafts: list[Draft]) -> "VerifyBlock":
        n = 1 + max(len(d.tokens) for d in drafts)
        tokens = torch.zeros(len(drafts), n, dtype=torch.long)
        for i, (pend, d) in enumerate(zip(pending, drafts)):
            tokens[i, : 1 + len(d.tokens)] = torch.tensor([pend] + d.tokens)
        n_valid = [1 + len(d.tokens) for d in drafts]
        if all(d.parents is None for d in drafts):
            return VerifyBlock(tokens, n_valid, None)
        parents = torch.full((len(drafts), n), -1, dtype=torch.long)
        for i, d in enumerate(drafts):
            parents[i, 1 : 1 + len(d.tokens)] = torch.tensor(d.tree_parents(), dtype=torch.long) + 1
        return VerifyBlock(tokens, n_valid, parents)


def _tested(draft: Draft, accepted: int, path: list[int] | None) -> int:
    """Draft tokens that were put to the test: the accepted ones and, after them, one rejected
    (a tree tests one branch; alternatives it did not reach say nothing about alpha)."""
    if path is None:
        return len(draft.tokens)
    last = path[-1] if path else -1
    has_child = any(par == last for par in draft.tree_parents())
    return accepted + (1 if has_child else 0)


def _eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end generation by default: the config's, generation_config.json's (often a
    list, e.g. Llama 3 instruct's end-of-turn ids beside its end of text) and the tokenizer's."""
    ids: set[int] = set()
    for source in (model.config, getattr(model, "generation_config", None)):
        found = getattr(source, "eos_token_id", None)
        ids.update(found if isinstance(found, (list, tuple)) else [] if found is None else [found])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
