"""Drafters: propose the next few tokens of a sequence for the verifier to check.

The protocol mirrors the wire contract between drafter and verifier actors:
  start(seq)       a sequence arrives with its prompt
  propose(reqs)    draft up to k tokens for each sequence (batched across sequences)
  verdict(...)     the verifier kept `accepted` drafts and then `next_token`
  stop(seq_id)     the sequence is finished; free its state
A drafter's own context for a sequence is always prompt + what verdicts confirmed, so it never
needs the verifier's state and may be replaced or restarted at any time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specserve.actors.engine import randomness
from specserve.actors.engine.request import SamplingParams
from specserve.actors.engine.runner import ModelRunner
from specserve.kernels.sampling import sample_from, sampling_probs, truncate_top_m


@dataclass
class Draft:
    """Draft tokens d_1..d_k' and, when sampling, the sparse q each was sampled from."""

    tokens: list[int]
    q_ids: torch.Tensor | None = None  # [k', m] int64
    q_probs: torch.Tensor | None = None  # [k', m] float32
    forwards: int = 0  # drafter forward passes spent on this draft
    requested: int = 0  # the k that was asked for (0: speculation was off for this step)
    seconds: float | None = None  # drafting time measured by a remote drafter (None: local, timed by the caller)


@dataclass
class DraftRequest:
    """Ask for at most `k` draft tokens of sequence `seq_id`."""

    seq_id: int
    k: int


@dataclass
class SeqState:
    """What a drafter keeps per sequence."""

    context: list[int]
    params: SamplingParams
    seed: int
    prompt_len: int
    last_draft: list[int] = field(default_factory=list)
    slot: int = -1  # KV slot (model drafter)
    fed: int = 0  # context tokens already in the drafter's KV cache (model drafter)


class BaseDrafter:
    """Bookkeeping shared by all drafters."""

    name = "base"

    def __init__(self):
        self.seqs: dict[int, SeqState] = {}

    def start(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        """Begin drafting for a new sequence."""
        seed = params.seed if params.seed is not None else randomness.fresh_seed()
        self.seqs[seq_id] = SeqState(list(prompt_ids), params, seed, len(prompt_ids))

    def verdict(self, seq_id: int, accepted: int, next_token: int) -> None:
        """The verifier kept the first `accepted` drafts, then emitted `next_token`."""
        st = self.seqs[seq_id]
        st.context.extend(st.last_draft[:accepted])
        st.context.append(next_token)
        st.last_draft = []

    def stop(self, seq_id: int) -> None:
        """Forget a finished sequence."""
        self.seqs.pop(seq_id, None)

    def has_ahead_work(self) -> bool:
        """Whether `draft_ahead` has something useful to do (pipelined drafting)."""
        return False

    def draft_ahead(self) -> None:
        """Spend idle time drafting past the last draft, assuming it is fully accepted."""

    def propose(self, reqs: list[DraftRequest]) -> list[Draft]:
        raise NotImplementedError


class NgramDrafter(BaseDrafter):
    """Prompt lookup: continue the sequence the way its latest matching n-gram continued.

    Costs no model. Its draft is deterministic, so q is a point mass on each draft token.
    """

    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1):
        super().__init__()
        self.max_n, self.min_n = max_n, min_n
        self._index: dict[int, dict[tuple, int]] = {}
        self._indexed: dict[int, int] = {}

    def start(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        super().start(seq_id, prompt_ids, params)
        self._index[seq_id], self._indexed[seq_id] = {}, 0

    def stop(self, seq_id: int) -> None:
        super().stop(seq_id)
        self._index.pop(seq_id, None)
        self._indexed.pop(seq_id, None)

    def _update_index(self, seq_id: int) -> None:
        """Record, for every n-gram followed by a known token, where its latest follower is."""
        ctx, index = self.seqs[seq_id].context, self._index[seq_id]
        for t in range(max(1, self._indexed[seq_id]), len(ctx)):
            for n in range(self.min_n, self.max_n + 1):
                if t - n >= 0:
                    index[tuple(ctx[t - n : t])] = t
        self._indexed[seq_id] = len(ctx)

    def _lookup(self, seq_id: int, k: int) -> list[int]:
        ctx, index = self.seqs[seq_id].context, self._index[seq_id]
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(ctx) >= n and (pos := index.get(tuple(ctx[-n:]))) is not None:
                return ctx[pos : pos + k]
        return []

    def propose(self, reqs: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for r in reqs:
            self._update_index(r.seq_id)
            tokens = self._lookup(r.seq_id, r.k) if r.k > 0 else []
            st = self.seqs[r.seq_id]
            st.last_draft = tokens
            draft = Draft(tokens, requested=r.k)
            if not st.params.greedy:
                draft.q_ids = torch.tensor(tokens, dtype=torch.long).view(-1, 1)
                draft.q_probs = torch.ones(len(tokens), 1)
            drafts.append(draft)
        return drafts


class ModelDrafter(BaseDrafter):
    """A small LM with its own KV cache, batched across sequences.

    Drafting stops early when the drafter's confidence (its top probability) falls below
    `confidence_threshold`: such a token is likely rejected and would only lengthen the
    verification block. When sampling, each draft token is sampled from q = the request's
    distribution over the drafter's logits truncated to its `top_m` tokens, and exactly that
    sparse q is returned for verification.
    """

    name = "model"

    def __init__(self, runner: ModelRunner, confidence_threshold: float = 0.4, top_m: int = 16):
        super().__init__()
        self.runner = runner
        self.confidence_threshold = confidence_threshold
        self.top_m = top_m

    def start(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        """Reserve a cache slot and prefill all but the last prompt token (admission, not drafting)."""
        super().start(seq_id, prompt_ids, params)
        st = self.seqs[seq_id]
        st.slot = self.runner.add_sequence()
        if len(prompt_ids) > 1:
            self.runner.forward([st.slot], torch.tensor([prompt_ids[:-1]]), logits_to_keep=1)
            st.fed = len(prompt_ids) - 1

    def stop(self, seq_id: int) -> None:
        st = self.seqs.get(seq_id)
        if st is not None:
            self.runner.free(st.slot)
        super().stop(seq_id)

    def verdict(self, seq_id: int, accepted: int, next_token: int) -> None:
        st = self.seqs[seq_id]
        base = len(st.context)
        super().verdict(seq_id, accepted, next_token)
        # the cache holds context + fed drafts; keep only the drafts the verifier accepted
        st.fed = min(st.fed, base + accepted)
        self.runner.truncate(st.slot, st.fed)

    def propose(self, reqs: list[DraftRequest]) -> list[Draft]:
        live = [r for r in reqs if r.k > 0]
        drafts = {r.seq_id: Draft([], requested=r.k) for r in reqs}
        if live:
            self._draft_rounds(live, drafts)
        for r in reqs:
            self.seqs[r.seq_id].last_draft = drafts[r.seq_id].tokens
        return [drafts[r.seq_id] for r in reqs]

    def _draft_rounds(self, live: list[DraftRequest], drafts: dict[int, Draft]) -> None:
        """Autoregressive drafting: first round feeds each sequence's unfed context."""
        feeds = {r.seq_id: self.seqs[r.seq_id].context[self.seqs[r.seq_id].fed :] for r in live}
        active = list(live)
        while active:
            logits = self._forward([self.seqs[r.seq_id] for r in active], [feeds[r.seq_id] for r in active])
            still = []
            for row, r in enumerate(active):
                token, keep = self._pick(r.seq_id, logits[row], drafts[r.seq_id])
                drafts[r.seq_id].forwards += 1
                if keep and len(drafts[r.seq_id].tokens) < r.k:
                    feeds[r.seq_id] = [token]
                    still.append(r)
            active = still

    def _forward(self, states: list[SeqState], feeds: list[list[int]]) -> torch.Tensor:
        """Feed each sequence its tokens; logits at each row's last fed token.  # [batch, vocab]"""
        n = max(len(f) for f in feeds)
        tokens = torch.zeros(len(feeds), n, dtype=torch.long)
        for i, f in enumerate(feeds):
            tokens[i, : len(f)] = torch.tensor(f)
        n_valid = [len(f) for f in feeds]
        same = all(nv == n for nv in n_valid)
        # equal feeds need only the last position's logits: the vocabulary projection for one
        # row is a matrix-vector product, several times cheaper on a CPU than for two rows
        logits = self.runner.forward([s.slot for s in states], tokens, n_valid, logits_to_keep=1 if same else 0)
        for s, nv in zip(states, n_valid):
            s.fed += nv
        last = torch.zeros(len(feeds), dtype=torch.long) if same else torch.tensor(n_valid) - 1
        return logits[torch.arange(len(feeds)), last]

    def _pick(self, seq_id: int, logits: torch.Tensor, draft: Draft) -> tuple[int, bool]:
        """Choose the next draft token; returns (token, whether it was kept)."""
        st = self.seqs[seq_id]
        if st.params.greedy:
            probs = torch.softmax(logits.float(), dim=-1)
            conf, token = probs.max(dim=-1)
            if float(conf) < self.confidence_threshold:
                return int(token), False
            draft.tokens.append(int(token))
            return int(token), True
        p = st.params
        q = sampling_probs(logits.unsqueeze(0), torch.tensor([p.temperature]), torch.tensor([p.top_k]),
                           torch.tensor([p.top_p], dtype=torch.float64))[0]
        ids, probs = truncate_top_m(q, self.top_m)
        position = len(st.context) - st.prompt_len + len(draft.tokens)
        noise = randomness.exp_noise(st.seed, position, ids.shape[0], randomness.DRAFT)
        token = int(ids[sample_from(probs, noise)])
        if float(probs[0]) < self.confidence_threshold:
            return token, False
        draft.tokens.append(token)
        draft.q_ids = ids.view(1, -1) if draft.q_ids is None else torch.cat([draft.q_ids, ids.view(1, -1)])
        draft.q_probs = probs.view(1, -1) if draft.q_probs is None else torch.cat([draft.q_probs, probs.view(1, -1)])
        return token, True
