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
    AcceptanceTracker, CostModel, DraftLengthConfig, best_draft_length,
)
from specserve.actors.engine.drafters import BaseDrafter, Draft, DraftRequest
from specserve.actors.engine.request import (
    GenerationResult, InvalidRequestError, SamplingParams, SpecStats,
)
from specserve.actors.engine.runner import ModelRunner
from specserve.actors.engine.stops import StopChecker
from specserve.kernels.sampling import sampling_probs, sparse_to_dense
from specserve.actors.engine import randomness
from specserve.kernels.verify import accept_drafts, sample_next, verify_greedy


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
    finish_reason: str | None = None

    def stats(self) -> SpecStats:
        return SpecStats(self.drafted, self.accepted, self.steps)


@dataclass
class Timing:
    """Wall time the engine spent drafting and verifying, for benchmarks and the cost model."""

    draft_s: float = 0.0
    draft_forwards: int = 0
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
                 policy: DraftLengthConfig = DraftLengthConfig(), rtt_s: float = 0.0):
        self.target = target
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.policy = policy
        self.cost = CostModel(policy, rtt_s)
        self.eos_ids = _eos_ids(target.model.config, tokenizer)
        self.seqs: dict[int, Sequence] = {}
        self.timing = Timing()
        self._next_id = 0
        self._off_steps = 0  # consecutive steps in which no sequence drafted

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
        limit = self.target.cfg.max_seq_len - self.policy.k_max - 1
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
            StopChecker(self.tokenizer, params, self.eos_ids), AcceptanceTracker(self.policy),
        )
        if self.drafter is not None:
            self.drafter.start(seq_id, prompt_ids, params)
        return seq_id

    def release(self, seq_id: int) -> None:
        """Free a sequence's cache slot and drafter state (finished or cancelled)."""
        seq = self.seqs.pop(seq_id)
        self.target.free(seq.slot)
        if self.drafter is not None:
            self.drafter.stop(seq_id)

    # -- one step --------------------------------------------------------------------------------

    def _draft_lengths(self, seqs: list[Sequence]) -> list[int]:
        if self.drafter is None:
            return [0] * len(seqs)
        timed = [s for s in seqs if not (s.params.seed is not None and not s.params.greedy)]
        # one k for the batch: a longer block in one row makes the whole verify forward longer
        batch_k = best_draft_length([s.tracker.alpha for s in timed], self.cost, self.policy.k_max) if timed else 0
        ks = []
        for s in seqs:
            k = self.policy.fixed_k
            if k is None and s.params.seed is not None and not s.params.greedy:
                # timings must not steer a seeded request: its output would vary run to run
                k = self.policy.k_max
            if k is None:
                k = batch_k
            ks.append(min(k, s.params.max_tokens - len(s.generated) - 1))
        # speculation off everywhere for a while: draft one token once, to re-measure its cost
        # (once per batch, not per sequence: any draft makes the whole batch wait for it)
        self._off_steps = 0 if any(ks) else self._off_steps + 1
        if self._off_steps >= self.policy.probe_every:
            self._off_steps = 0
            ks = [min(1, s.params.max_tokens - len(s.generated) - 1) for s in seqs]
        return ks

    def _draft(self, seqs: list[Sequence]) -> list[Draft]:
        ks = self._draft_lengths(seqs)
        if self.drafter is None or not any(ks):
            return [Draft([]) for _ in seqs]
        t0 = time.perf_counter()
        drafts = self.drafter.propose([DraftRequest(s.seq_id, k) for s, k in zip(seqs, ks)])
        elapsed, forwards = time.perf_counter() - t0, max(d.forwards for d in drafts)
        remote = [d.seconds for d in drafts if d.seconds is not None]
        if remote:  # a remote drafter: its own drafting time, and the rest is the round trip
            self.cost.observe_draft(forwards, max(remote))
            self.cost.observe_rtt(elapsed - max(remote))
        else:
            self.cost.observe_draft(forwards, elapsed)
        self.timing.draft_s += elapsed
        self.timing.draft_forwards += forwards
        return drafts

    def step(self) -> list[StepOutput]:
        """Draft, verify and commit one block for every active sequence."""
        seqs = list(self.seqs.values())
        if not seqs:
            return []
        self.cost.use_batch(len(seqs))
        drafts = self._draft(seqs)
        n = 1 + max(len(d.tokens) for d in drafts)
        tokens = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, (s, d) in enumerate(zip(seqs, drafts)):
            tokens[i, : 1 + len(d.tokens)] = torch.tensor([s.pending] + d.tokens)
        n_valid = [1 + len(d.tokens) for d in drafts]
        lengths = [self.target.length(s.slot) for s in seqs]
        t0 = time.perf_counter()
        logits = self.target.forward([s.slot for s in seqs], tokens, n_valid)  # [batch, n, vocab]
        num_acc, next_tok = self._verify(seqs, drafts, tokens, logits)
        elapsed = time.perf_counter() - t0
        self.cost.observe_verify(n, elapsed)
        self.timing.verify_s += elapsed
        self.timing.verify_steps += 1
        return [self._commit(s, d, length, a, t) for s, d, length, a, t in
                zip(seqs, drafts, lengths, num_acc.tolist(), next_tok.tolist())]

    def _verify(self, seqs, drafts, tokens, logits):
        """(num_accepted [batch], next_token [batch]) for a batch mixing greedy and sampled rows."""
        draft_tokens = tokens[:, 1:]  # [batch, n-1]
        draft_len = torch.tensor([len(d.tokens) for d in drafts])
        num_acc, next_tok = verify_greedy(logits.argmax(dim=-1), draft_tokens, draft_len)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            acc_s, tok_s = self._verify_sampled([seqs[i] for i in sampled], [drafts[i] for i in sampled],
                                                draft_tokens[sampled], draft_len[sampled], logits[sampled])
            num_acc[sampled], next_tok[sampled] = acc_s, tok_s
        return num_acc, next_tok

    def _verify_sampled(self, seqs, drafts, draft_tokens, draft_len, logits):
        batch, n, vocab = logits.shape
        def per_row(values, dtype):
            return torch.tensor(values, dtype=dtype).unsqueeze(1).expand(batch, n)

        p = sampling_probs(logits, per_row([s.params.temperature for s in seqs], torch.float32),
                           per_row([s.params.top_k for s in seqs], torch.long),
                           per_row([s.params.top_p for s in seqs], torch.float64))  # [batch, n, vocab]
        q = torch.zeros(batch, n - 1, vocab)
        for i, d in enumerate(drafts):
            if d.tokens:
                q[i, : len(d.tokens)] = sparse_to_dense(d.q_ids, d.q_probs, vocab)
        starts = [len(s.generated) for s in seqs]  # output position of each row's first new token
        uniforms = torch.stack([randomness.uniforms(s.seed, t, n - 1) for s, t in zip(seqs, starts)])
        num_acc = accept_drafts(p, q, draft_tokens, draft_len, uniforms)
        noise = torch.stack([randomness.exp_noise(s.seed, t + a, vocab)
                             for s, t, a in zip(seqs, starts, num_acc.tolist())])
        return num_acc, sample_next(p, q, num_acc, draft_len, noise)

    def _commit(self, seq: Sequence, draft: Draft, length: int, accepted: int, next_token: int) -> StepOutput:
        """Keep pending + accepted drafts in the cache, emit tokens up to the first stop."""
        self.target.truncate(seq.slot, length + 1 + accepted)
        seq.drafted += len(draft.tokens)
        seq.accepted += accepted
        seq.steps += 1
        seq.tracker.observe(len(draft.tokens), accepted, speculation_off=draft.requested == 0)
        emitted = []
        for tok in draft.tokens[:accepted] + [next_token]:
            seq.generated.append(tok)
            emitted.append(tok)
            seq.finish_reason = seq.stops.check(seq.generated)
            if seq.finish_reason:
                break
        seq.pending = next_token
        if not seq.finish_reason and self.drafter is not None:
            self.drafter.verdict(seq.seq_id, accepted, next_token)
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


def _eos_ids(config, tokenizer) -> set[int]:
    """Token ids that end generation by default."""
    ids = getattr(config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
