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

import time
from dataclasses import dataclass, field, replace

import torch

from specserve.actors.engine import randomness
from specserve.actors.engine.request import SamplingParams
from specserve.actors.engine.runner import ModelRunner
from specserve.actors.engine.suffix import SuffixConfig, SuffixIndex
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
    parents: list[int] | None = None  # a token tree: parent draft index of each token, -1 = the root (None: a chain)
    catch_up: bool = False  # the drafter fed other context before drafting (what it missed, a new prompt): no cost sample
    fed_missed: bool = False  # a remote drafter also fed a few tokens it had missed: no draft-cost sample (a round-trip one)
    # model drafts: per token, (the drafter's probability of it, its likeliest other token, that
    # token's probability): what the drafter expects of the verdict (Branch)
    beliefs: list[tuple[float, int, float]] | None = None

    def tree_parents(self) -> list[int]:
        """Parent of every draft token (-1: the pending token); a chain's are i - 1."""
        return self.parents if self.parents is not None else list(range(-1, len(self.tokens) - 1))


@dataclass
class Branch:
    """A draft made ahead for the verdict that rejects the last draft first at position `j` and
    emits `token` (the drafter's likeliest other token there): the speculation cache's other
    outcomes (ModelDrafter.take_pushes)."""

    j: int
    token: int
    k: int  # tokens wanted
    draft: Draft = field(default_factory=lambda: Draft([], beliefs=[]))
    done: bool = False  # k reached or the confidence stop ended it
    pushed: int = 0  # tokens of it pushed so far


@dataclass
class DraftRequest:
    """Ask for at most `k` draft tokens of sequence `seq_id`."""

    seq_id: int
    k: int
    nodes: int = 0  # > 0: a token tree of at most this many tokens and depth k (drafters that can)


@dataclass
class SeqState:
    """What a drafter keeps per sequence."""

    context: list[int]
    params: SamplingParams
    seed: int
    prompt_len: int
    last_draft: list[int] = field(default_factory=list)
    slot: int = -1  # KV slot (model drafter)
    fed: int = 0  # tokens of context + drafts already in the drafter's KV cache (model drafter)
    # pipelined drafting (model drafter): work done while the last draft is being verified
    awaiting: bool = False  # the last draft is out for verification
    last_k: int = 0  # k asked for last time: how far to draft ahead
    guess: int | None = None  # predicted next_token if the whole last draft is accepted
    ahead: Draft | None = None  # drafts after last_draft + [guess]
    ahead_done: bool = False  # the confidence stop ended `ahead`
    ready: Draft | None = None  # `ahead` after a verdict that confirmed it: the next draft's start
    ready_done: bool = False
    ahead_ok: bool = True  # drafting ahead of the last draft is allowed (ModelDrafter's hit-rate gate)
    push: bool = False  # the verifier keeps a speculation cache: push `ahead` once complete (take_pushes)
    pushed: int = 0  # tokens of `ahead` pushed so far for the verdict now awaited
    push_outcomes: int = 1  # most verdict outcomes pushed per draft (Start.push_outcomes)
    beliefs: list = field(default_factory=list)  # Draft.beliefs of last_draft ([] if unknown)
    branches: list | None = None  # Branch drafts for the verdict now awaited (None: not planned yet)
    kv_branch: Branch | None = None  # the branch the KV cache holds past context + last_draft[:j]
    sent_at: float = 0.0  # when the last draft went out (monotonic)
    verdict_s: float | None = None  # decayed mean time from a draft to its verdict


class BaseDrafter:
    """Bookkeeping shared by all drafters."""

    name = "base"
    remote = False  # drafts come over the network (a round trip per step)
    drafts_locally = False  # a remote drafter that also makes drafts with no round trip (local_drafts)

    def __init__(self):
        self.seqs: dict[int, SeqState] = {}
        self.weight_version = ""  # the drafter weights' version (model drafters)

    def version(self, seq_id: int) -> str:
        """Weight version that drafted this sequence's last draft."""
        return self.weight_version

    def start(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        """Begin drafting for a new sequence."""
        seed = params.seed if params.seed is not None else randomness.fresh_seed()
        self.seqs[seq_id] = SeqState(list(prompt_ids), params, seed, len(prompt_ids))

    def verdict(self, seq_id: int, accepted: int, next_token: int, path: list[int] | None = None) -> None:
        """The verifier kept `accepted` drafts, then emitted `next_token`.

        `path` names the kept draft indices when the draft was a tree (None: the first `accepted`).
        """
        st = self.seqs[seq_id]
        kept = path if path is not None else range(accepted)
        st.context.extend(st.last_draft[i] for i in kept)
        st.context.append(next_token)
        st.last_draft = []

    def stop(self, seq_id: int) -> None:
        """Forget a finished sequence."""
        self.seqs.pop(seq_id, None)

    def finished(self, seq_id: int, tokens: list[int]) -> None:
        """The sequence ended with `tokens` (prompt + output), before `stop`: drafters that learn
        from traffic (a suffix index) keep them; others need nothing."""

    def has_ahead_work(self) -> bool:
        """Whether `draft_ahead` has something useful to do (pipelined drafting)."""
        return False

    def swap_weights(self, state: dict, version: str) -> None:
        """Replace the drafter's weights (hot swap); drafters without weights cannot."""
        raise ValueError(f"the {self.name} drafter has no weights to swap")

    def draft_ahead(self) -> None:
        """Spend idle time drafting past the last draft, assuming it is fully accepted."""

    def take_pushes(self) -> list[tuple[int, int, int, Draft]]:
        """Drafts made ahead to push to a verifier's speculation cache, each once:
        (seq_id, context length and last token of the state it assumes, draft)."""
        return []

    def took(self, seq_id: int, tokens: list[int], k: int) -> None:
        """After a verdict: the verifier took the pushed draft for the new state and verifies
        `tokens` of it (asked for k), as if `propose` had returned them."""
        st = self.seqs[seq_id]
        st.last_draft, st.awaiting, st.last_k, st.ready = list(tokens), True, k, None

    def local_drafts(self, reqs: list[DraftRequest]) -> dict[int, Draft]:
        """Drafts of some of `reqs` that need no round trip, made now (by seq_id); `propose` with
        the same sequences returns them. Drafters that run in-process: none to single out."""
        return {}

    def propose(self, reqs: list[DraftRequest]) -> list[Draft]:
        raise NotImplementedError


class PromptLookup:
    """Per sequence, where each of its n-grams (n = min_n..max_n) was last followed by a token:
    continuing the sequence the way its latest matching n-gram continued (prompt lookup)."""

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n
        self._index: dict[int, dict[tuple, int]] = {}
        self._indexed: dict[int, int] = {}

    def drop(self, seq_id: int) -> None:
        self._index.pop(seq_id, None)
        self._indexed.pop(seq_id, None)

    def _index_of(self, seq_id: int, context: list[int]) -> dict[tuple, int]:
        """The sequence's n-grams that a token followed in `context`, each with where its latest
        occurrence ends. `context` only grows between calls for one sequence."""
        index = self._index.setdefault(seq_id, {})
        done = self._indexed.get(seq_id, 0)
        if done > len(context):  # not the context indexed so far: start over
            index.clear()
            done = 0
        for t in range(max(1, done), len(context)):
            for n in range(self.min_n, self.max_n + 1):
                if t - n >= 0:
                    index[tuple(context[t - n : t])] = t
        self._indexed[seq_id] = len(context)
        return index

    def continuation(self, seq_id: int, context: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the context's longest
        matching suffix ([] if none). `context` only grows between calls for one sequence."""
        if k <= 0:
            return []
        index = self._index_of(seq_id, context)
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(context) >= n and (pos := index.get(tuple(context[-n:]))) is not None:
                return context[pos : pos + k]
        return []

    def occurred(self, seq_id: int, context: list[int], gram: list[int]) -> bool:
        """Whether `gram` (min_n..max_n tokens) occurs in `context`, its end included."""
        gram = tuple(gram)
        return gram in self._index_of(seq_id, context) or tuple(context[-len(gram):]) == gram


def lookup_draft(tokens: list[int], requested: int, params: SamplingParams) -> Draft:
    """A draft of looked-up tokens: deterministic, so when sampling q is a point mass on each."""
    draft = Draft(tokens, requested=requested)
    if not params.greedy:
        draft.q_ids = torch.tensor(tokens, dtype=torch.long).view(-1, 1)
        draft.q_probs = torch.ones(len(tokens), 1)
    return draft


def suffix_lookup(min_match: int, cfg: SuffixConfig | None) -> SuffixIndex | None:
    """The suffix index that drafts where a sequence's last `min_match` or more tokens occurred
    before (in it or in finished sequences); None where `min_match` is 0 (no lookup)."""
    if min_match <= 0:
        return None
    cfg = cfg or SuffixConfig()
    return SuffixIndex(replace(cfg, min_match=min_match, max_match=max(cfg.max_match, min_match)))


def suffix_draft(index: SuffixIndex, seq_id: int, st: SeqState, k: int) -> list[int]:
    """The suffix index's draft of a sequence; a seeded request's from its own context only."""
    return index.draft(seq_id, st.context, k, shared=not st.params.seeded_sampling)


class NgramDrafter(BaseDrafter):
    """Suffix lookup: continue the sequence the way its longest earlier match continued, in it
    or in the sequences this drafter served before (actors/engine/suffix.py; prompt lookup is
    its special case).

    Costs no model. Its draft is deterministic, so q is a point mass on each draft token.
    """

    name = "ngram"

    def __init__(self, suffix: SuffixConfig | None = None, min_match: int = 1):
        super().__init__()
        self.lookup = suffix_lookup(max(1, min_match), suffix)

    def start(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        super().start(seq_id, prompt_ids, params)
        self.lookup.drop(seq_id)

    def finished(self, seq_id: int, tokens: list[int]) -> None:
        self.lookup.finish(seq_id, tokens)

    def stop(self, seq_id: int) -> None:
        super().stop(seq_id)
        self.lookup.drop(seq_id)

    def propose(self, reqs: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for r in reqs:
            st = self.seqs[r.seq_id]
            tokens = suffix_draft(self.lookup, r.seq_id, st, r.k)
            st.last_draft = tokens
            drafts.append(lookup_draft(tokens, r.k, st.params))
        return drafts


AHEAD_MIN_HIT_RATE = 0.1  # below this share of verdicts confirming it, drafting ahead is explored only
AHEAD_EXPLORE_EVERY = 16  # ... on one draft in this many (to notice when it starts paying)
AHEAD_EMA = 0.05  # decay of the hit counts per verdict on work drafted ahead (~20 verdicts of memory)
# A rejection outcome is drafted for only where the drafter itself gives it at least this chance
# (the draft accepted up to there, then its likeliest other token), and only while such drafts
# are taken at least half as often (else explored on one draft in AHEAD_EXPLORE_EVERY).
BRANCH_MIN_PROB = 0.1
TIME_EMA = 0.2  # weight of the newest sample in the drafter's forward time and each verdict's wait

# A draft's first forward normally feeds the verdict's tokens the cache lacks: the emitted token,
# and the last draft when the whole draft was accepted. More means the drafter is catching up on
# steps it sat out (speculation was off), and that forward is no measure of a draft step's cost.
CATCH_UP_TOKENS = 2


class ModelDrafter(BaseDrafter):
    """A small LM with its own KV cache, batched across sequences.

    Drafting stops early when the drafter's confidence (its top probability) falls below
    `confidence_threshold`: such a token is likely rejected and would only lengthen the
    verification block. When sampling, each draft token is sampled from q = the request's
    distribution over the drafter's logits truncated to its `top_m` tokens, and exactly that
    sparse q is returned for verification.

    Pipelined drafting: while a draft is out for verification, `draft_ahead` guesses the
    verifier's next token (the drafter's argmax after the whole draft) and drafts on from it.
    A verdict that accepts the whole draft and emits the guessed token makes that work the
    start of the next draft; any other verdict discards it. Drafted ahead or not, a token is
    chosen by the same rule with the same random numbers, so only timing changes.

    Suffix lookup (`lookup_min_n` > 0, actors/engine/suffix.py, `suffix` its knobs): where the
    sequence's last `lookup_min_n` or more tokens occurred before in it or in the sequences this
    drafter served before, the draft is what most often followed them (as the n-gram drafter
    drafts, a point-mass q when sampling), at no model cost; the model drafts the rest. Text that
    repeats itself (code, edits, quotes of the prompt) is drafted far better by lookup than by
    a small model, and text that does not is left to the model. The model's cache catches up on
    the looked-up tokens the verifier kept in its next forward. `ahead_lookup` > 0: the verifier
    drafts by prompt lookup itself where the last this many tokens repeat, so drafting ahead stops
    after the guessed token wherever that lookup will draft the next block anyway. Drafting
    ahead pays only where verdicts confirm it often enough: below `ahead_min_hit_rate` of the
    recent verdicts on such work (a full batch of sequences whose drafts are rarely accepted
    whole), it runs after one draft in AHEAD_EXPLORE_EVERY only, and otherwise leaves the CPU to
    the verifier it may share it with.
    """

    name = "model"

    def __init__(self, runner: ModelRunner, confidence_threshold: float = 0.0, top_m: int = 16,
                 lookup_min_n: int = 0, ahead_lookup: int = 0, ahead_min_hit_rate: float = AHEAD_MIN_HIT_RATE,
                 suffix: SuffixConfig | None = None):
        super().__init__()
        self.ahead_min_hit_rate = ahead_min_hit_rate
        # verdicts on work drafted ahead that confirmed it, decayed (a prior of one hit in one trial)
        self._ahead_rate_hits, self._ahead_rate_trials = 1.0, 1.0
        self._drafts_sent = 0
        # the verifier's prompt lookup, to know where drafting ahead is wasted (None: it does none)
        self.ahead_index = PromptLookup(ahead_lookup, ahead_lookup) if ahead_lookup > 0 else None
        self.runner = runner
        self.confidence_threshold = confidence_threshold
        self.top_m = top_m
        self.chain_lookup = suffix_lookup(lookup_min_n, suffix)
        self.lookup_drafts = 0  # drafts that came from prompt lookup
        self.ahead_hits = 0  # verdicts that confirmed pipelined work
        self.ahead_misses = 0  # verdicts that discarded it
        # the speculation cache's other outcomes: rejections drafted for (Branch)
        self.forward_s: float | None = None  # decayed mean time of one drafting-ahead forward
        self.verdict_s: float | None = None  # ... from a draft to its verdict, over all sequences
        self.branch_min_prob = BRANCH_MIN_PROB
        self._branch_rate_hits, self._branch_rate_trials = 1.0, 1.0
        self.branch_pushes = 0  # Branch drafts pushed
        self.branch_hits = 0  # verdicts that a Branch draft was made for

    def swap_weights(self, state: dict, version: str) -> None:
        """Load new weights (same architecture) between rounds. Every live sequence keeps its
        context; its cache is emptied and refilled on its next draft, and work drafted ahead
        with the old weights is dropped. A state that does not fit raises and changes nothing."""
        model = self.runner.model
        current = model.state_dict()
        if set(state) != set(current) or any(state[k].shape != current[k].shape for k in current):
            raise ValueError(f"weights {version} do not fit this drafter's architecture")
        model.load_state_dict(state)
        self.runner.weights_changed()
        self.weight_version = version
        for st in self.seqs.values():
            st.fed = 0
            self.runner.truncate(st.slot, 0)
            st.guess, st.ahead, st.ahead_done, st.ready, st.ready_done = None, None, False, None, False
            st.branches, st.kv_branch = None, None

    def start(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        """Reserve a cache slot and prefill all but the last prompt token (admission, not drafting)."""
        super().start(seq_id, prompt_ids, params)
        for index in (self.chain_lookup, self.ahead_index):
            if index is not None:
                index.drop(seq_id)
        st = self.seqs[seq_id]
        st.slot = self.runner.add_sequence()
        if len(prompt_ids) > 1:
            self.runner.forward([st.slot], torch.tensor([prompt_ids[:-1]]), logits_to_keep=1)
            st.fed = len(prompt_ids) - 1

    def stop(self, seq_id: int) -> None:
        st = self.seqs.get(seq_id)
        if st is not None:
            self.runner.free(st.slot)
        for index in (self.chain_lookup, self.ahead_index):
            if index is not None:
                index.drop(seq_id)
        super().stop(seq_id)

    def finished(self, seq_id: int, tokens: list[int]) -> None:
        if self.chain_lookup is not None:
            self.chain_lookup.finish(seq_id, tokens)

    def verdict(self, seq_id: int, accepted: int, next_token: int, path: list[int] | None = None) -> None:
        st = self.seqs[seq_id]
        base = len(st.context)
        held = self._cache_holds(st)
        # the whole draft accepted and the guessed token emitted: the work drafted ahead holds
        hit = st.guess == next_token and accepted == len(st.last_draft) and st.ahead is not None
        # ... or the first rejection and the token emitted there are those a Branch was drafted for
        branch = None if hit or path is not None else next(
            (b for b in st.branches or [] if b.j == accepted and b.token == next_token and b.draft.tokens), None)
        super().verdict(seq_id, accepted, next_token, path)
        if st.guess is not None:  # work was drafted ahead of this verdict
            keep = 1.0 - AHEAD_EMA
            self._ahead_rate_hits = keep * self._ahead_rate_hits + float(hit)
            self._ahead_rate_trials = keep * self._ahead_rate_trials + 1.0
        if st.branches:
            keep = 1.0 - AHEAD_EMA
            self._branch_rate_hits = keep * self._branch_rate_hits + float(branch is not None)
            self._branch_rate_trials = keep * self._branch_rate_trials + 1.0
        if hit:
            st.ready, st.ready_done = st.ahead, st.ahead_done
            self.ahead_hits += 1
        elif branch is not None:
            st.ready, st.ready_done = branch.draft, branch.done
            self.branch_hits += 1
        else:
            self.ahead_misses += st.guess is not None
            st.ready = None
        # the cache keeps what it holds of the new context and the draft ready to follow it
        new = st.context[base:] + (st.ready.tokens if st.ready is not None else [])
        self._cut(st, base + _common_prefix(held, new))
        if st.sent_at:
            waited = time.monotonic() - st.sent_at
            st.verdict_s, self.verdict_s = _decayed(st.verdict_s, waited), _decayed(self.verdict_s, waited)
        st.awaiting, st.guess, st.ahead, st.ahead_done, st.pushed = False, None, None, False, 0
        st.branches, st.kv_branch, st.sent_at = None, None, 0.0

    def _cache_holds(self, st: SeqState) -> list[int]:
        """The tokens past the context of which the KV cache holds a prefix (st.fed - context)."""
        if st.kv_branch is not None:
            b = st.kv_branch
            return st.last_draft[: b.j] + [b.token] + b.draft.tokens
        if st.ready is not None:  # a verdict came, the next draft has not been asked for yet
            return list(st.ready.tokens)
        return st.last_draft + ([st.guess] + st.ahead.tokens if st.guess is not None else [])

    def _cut(self, st: SeqState, length: int) -> None:
        """Keep at most `length` tokens of the sequence in the KV cache."""
        if st.fed > length:
            st.fed = length
            self.runner.truncate(st.slot, length)

    def propose(self, reqs: list[DraftRequest]) -> list[Draft]:
        drafts = {r.seq_id: self._from_ready(r) for r in reqs}
        looked_up = {r.seq_id for r in reqs if self._looked_up(r, drafts)}
        live = [r for r in reqs if r.k > 0 and r.seq_id not in looked_up
                and not self._ready_complete(r, drafts[r.seq_id])]
        if live:
            self._draft_rounds(live, drafts)
        now = time.monotonic()
        for r in reqs:
            st = self.seqs[r.seq_id]
            st.last_draft, st.awaiting, st.last_k = drafts[r.seq_id].tokens, True, r.k
            st.beliefs, st.sent_at, st.branches = list(drafts[r.seq_id].beliefs or []), now, None
            st.ready = None
            self._drafts_sent += 1
            st.ahead_ok = self.ahead_hit_rate >= self.ahead_min_hit_rate \
                or self._drafts_sent % AHEAD_EXPLORE_EVERY == 0
        return [drafts[r.seq_id] for r in reqs]

    def _from_ready(self, r: DraftRequest) -> Draft:
        """The start of this sequence's draft that pipelined drafting already produced."""
        st = self.seqs[r.seq_id]
        draft = Draft([], requested=r.k, beliefs=[])
        if st.ready is not None and r.k > 0 and st.ready.tokens:
            take = min(r.k, len(st.ready.tokens))
            draft.tokens = st.ready.tokens[:take]
            draft.beliefs = list(st.ready.beliefs or [])[:take]
            if st.ready.q_ids is not None:
                draft.q_ids, draft.q_probs = st.ready.q_ids[:take], st.ready.q_probs[:take]
        return draft

    def _looked_up(self, r: DraftRequest, drafts: dict[int, Draft]) -> bool:
        """Whether this sequence's draft comes from prompt lookup (then set in `drafts`): only
        where pipelined drafting left nothing ready and the context's suffix occurred before."""
        if self.chain_lookup is None or r.k <= 0 or drafts[r.seq_id].tokens:
            return False
        st = self.seqs[r.seq_id]
        tokens = suffix_draft(self.chain_lookup, r.seq_id, st, r.k)
        if not tokens:
            return False
        self._cut(st, len(st.context))  # drafts past the context the cache may hold are not this draft's
        drafts[r.seq_id] = lookup_draft(tokens, r.k, st.params)  # no beliefs: no Branch after it
        self.lookup_drafts += 1
        return True

    def _ready_complete(self, r: DraftRequest, draft: Draft) -> bool:
        """Nothing more to draft: k reached, or the ready draft already hit the confidence stop."""
        st = self.seqs[r.seq_id]
        return len(draft.tokens) >= r.k or (st.ready is not None and st.ready_done
                                             and len(draft.tokens) == len(st.ready.tokens))

    def _draft_rounds(self, live: list[DraftRequest], drafts: dict[int, Draft]) -> None:
        """Autoregressive drafting: the first round feeds each sequence's unfed tokens."""
        active = list(live)
        first = True
        while active:
            states = [self.seqs[r.seq_id] for r in active]
            feeds = [self._unfed(st, st.context + drafts[r.seq_id].tokens) for r, st in zip(active, states)]
            if first and max(len(f) for f in feeds) > CATCH_UP_TOKENS:
                for r in live:  # one batched forward: every row's time includes the long feed
                    drafts[r.seq_id].catch_up = True
            first = False
            logits = self._forward(states, feeds)
            still = []
            for row, (r, st) in enumerate(zip(active, states)):
                draft = drafts[r.seq_id]
                keep = self._pick(st, logits[row], draft, len(st.context) + len(draft.tokens))
                draft.forwards += 1
                if keep and len(draft.tokens) < r.k:
                    still.append(r)
            active = still

    # -- pipelined drafting ----------------------------------------------------------------------

    @property
    def ahead_hit_rate(self) -> float:
        """The recent share of verdicts on work drafted ahead that confirmed it."""
        return self._ahead_rate_hits / self._ahead_rate_trials

    def _wants_ahead(self, st: SeqState) -> bool:
        if not st.awaiting or st.last_k == 0 or st.ahead_done or not st.ahead_ok:
            return False
        return st.guess is None or len(st.ahead.tokens) < st.last_k  # guess and ahead are set together

    def _wants_branch(self, st: SeqState) -> bool:
        """Whether a Branch is to be planned or drafted: only once the work for the likeliest
        outcome (all accepted) is complete, for sequences whose verifier keeps the cache."""
        if not (st.push and st.awaiting and st.push_outcomes > 1 and st.guess is not None) or self._wants_ahead(st):
            return False
        return st.branches is None or any(not b.done for b in st.branches)

    def has_ahead_work(self) -> bool:
        return any(self._wants_ahead(st) or self._wants_branch(st) for st in self.seqs.values())

    @property
    def branch_hit_rate(self) -> float:
        """The recent share of verdicts with Branch drafts made for them that one matched."""
        return self._branch_rate_hits / self._branch_rate_trials

    def _plan_branches(self, seq_id: int, st: SeqState) -> list[Branch]:
        """The rejection outcomes worth a draft before the verdict comes: the cost model.

        Outcome j (the draft accepted up to j, the drafter's likeliest other token emitted
        there) has the chance the drafter's own probabilities give it; the likeliest ones of
        at least `branch_min_prob` are covered, at most push_outcomes - 1 of them (the first
        outcome is the whole draft accepted), each only if its draft (at least half of k) fits
        in the time left until the verdict, which the sequence's recent verdicts measure (all
        sequences' for a new one), at the drafter's measured forward time. Positions where the
        verifier's prompt lookup drafts anyway are skipped."""
        verdict_s = st.verdict_s if st.verdict_s is not None else self.verdict_s  # a new sequence: everyone's
        if not st.beliefs or len(st.beliefs) != len(st.last_draft) or verdict_s is None or self.forward_s is None:
            return []
        if self.branch_hit_rate < self.branch_min_prob / 2 and self._drafts_sent % AHEAD_EXPLORE_EVERY:
            return []
        reach, chances = 1.0, []
        for j, (p, alt, p_alt) in enumerate(st.beliefs):
            if reach * p_alt >= self.branch_min_prob and not self._lookup_follows(seq_id, st, st.last_draft[:j] + [alt]):
                chances.append((reach * p_alt, j, alt))
            reach *= p
        chances.sort(reverse=True)
        left = verdict_s - (time.monotonic() - st.sent_at)
        out = []
        for _, j, alt in chances[: st.push_outcomes - 1]:
            k = min(st.last_k, int(left / self.forward_s) - 1)  # a forward feeds the emitted token
            if k < max(1, (st.last_k + 1) // 2):
                break
            out.append(Branch(j, alt, k))
            left -= (k + 1) * self.forward_s
        return out

    def take_pushes(self) -> list[tuple[int, int, int, Draft]]:
        """Work drafted ahead for sequences whose verifier keeps a speculation cache: the draft
        for the verdict that accepts the whole last draft and emits the guessed token. Pushed
        once half of k is drafted (a verdict may come before the rest) and again when complete
        (k tokens, or the confidence stop); the later push for a state replaces the earlier."""
        out = []
        for seq_id, st in self.seqs.items():
            if not (st.push and st.awaiting and st.guess is not None and len(st.ahead.tokens) > st.pushed):
                continue
            n = len(st.ahead.tokens)
            if not (n >= st.last_k or st.ahead_done or (st.pushed == 0 and 2 * n >= st.last_k)):
                continue
            st.pushed = n
            draft = Draft(list(st.ahead.tokens), st.ahead.q_ids, st.ahead.q_probs, requested=st.last_k)
            out.append((seq_id, len(st.context) + len(st.last_draft) + 1, st.guess, draft))
        for seq_id, st in self.seqs.items():
            for b in (st.branches or []) if st.push and st.awaiting else []:
                n = len(b.draft.tokens)
                if n > b.pushed and (b.done or (b.pushed == 0 and 2 * n >= b.k)):
                    b.pushed = n
                    self.branch_pushes += 1
                    draft = Draft(list(b.draft.tokens), b.draft.q_ids, b.draft.q_probs, requested=b.k)
                    out.append((seq_id, len(st.context) + b.j + 1, b.token, draft))
        return out

    def took(self, seq_id: int, tokens: list[int], k: int) -> None:
        """The pushed draft is the next one: where the verdict confirmed the work drafted ahead,
        the cache holds its tokens already (cut back to the ones taken); otherwise (weights
        swapped meanwhile) the cache is cut back to the context and refed on the next draft."""
        st = self.seqs[seq_id]
        on_branch = st.ready is not None and st.ready.tokens[: len(tokens)] == list(tokens)
        self._cut(st, len(st.context) + (len(tokens) if on_branch else 0))
        beliefs = list(st.ready.beliefs or [])[: len(tokens)] if on_branch else []
        super().took(seq_id, tokens, k)
        st.beliefs, st.sent_at, st.branches = beliefs, time.monotonic(), None
        self._drafts_sent += 1

    def draft_ahead(self) -> None:
        """One batched forward of pipelined drafting for every sequence awaiting a verdict: the
        draft for the whole last draft accepted first, then its Branches (one KV cache row per
        sequence: a Branch drafts past the prefix it shares with what the row holds)."""
        for seq_id, st in self.seqs.items():
            if st.branches is None and self._wants_branch(st):
                st.branches = self._plan_branches(seq_id, st)
        work: list[tuple[int, SeqState, Branch | None]] = []
        for seq_id, st in self.seqs.items():
            if self._wants_ahead(st):
                work.append((seq_id, st, None))
            elif self._wants_branch(st):
                work.append((seq_id, st, next(b for b in st.branches if not b.done)))
        if not work:
            return
        futures = []
        for _, st, b in work:
            if b is None:
                futures.append(st.context + st.last_draft + ([] if st.guess is None else [st.guess])
                               + (st.ahead.tokens if st.ahead else []))
                continue
            tail = st.last_draft[: b.j] + [b.token] + b.draft.tokens
            if st.kv_branch is not b:
                self._cut(st, len(st.context) + _common_prefix(self._cache_holds(st), tail))
                st.kv_branch = b
            futures.append(st.context + tail)
        states = [st for _, st, _ in work]
        feeds = [self._unfed(st, f) for st, f in zip(states, futures)]
        t0 = time.perf_counter()
        logits = self._forward(states, feeds)
        if max(len(f) for f in feeds) <= CATCH_UP_TOKENS:  # a draft step's cost, not a catch-up's
            self.forward_s = _decayed(self.forward_s, time.perf_counter() - t0)
        for (seq_id, st, b), future, row in zip(work, futures, logits):
            if b is not None:
                b.done = not self._pick(st, row, b.draft, len(future)) or len(b.draft.tokens) >= b.k
                continue
            if st.guess is None:
                st.guess, st.ahead = int(row.argmax()), Draft([], beliefs=[])
                st.ahead_done = self._lookup_follows(seq_id, st, st.last_draft + [st.guess])
                continue
            position = len(future)  # == len(context after the hoped-for verdict) + drafted ahead
            st.ahead_done = not self._pick(st, row, st.ahead, position)

    def _lookup_follows(self, seq_id: int, st: SeqState, tail: list[int]) -> bool:
        """Whether the verifier's prompt lookup will draft after a verdict that extends the
        context by `tail`: its last `ahead_lookup` tokens occurred before (in the context;
        drafts are not looked at)."""
        if self.ahead_index is None:
            return False
        n = self.ahead_index.min_n
        gram = (st.context[-n:] + tail)[-n:]
        return len(gram) == n and self.ahead_index.occurred(seq_id, st.context, gram)

    # -- one forward and one token ----------------------------------------------------------------

    def _unfed(self, st: SeqState, future: list[int]) -> list[int]:
        """Tokens of `future` not in the cache yet: at least one, so a forward gives the next logits.

        The cache always holds a prefix of context + drafts; when it already holds all of
        `future` (or drafts past it), it is cut back so the last token is fed again.
        """
        self._cut(st, len(future) - 1)
        return future[st.fed :]

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
        # choosing tokens is per-row host work: bring the rows to the CPU once
        return logits[torch.arange(len(feeds), device=logits.device), last.to(logits.device)].float().cpu()

    def _sparse_q(self, st: SeqState, logits: torch.Tensor, length: int):
        """(ids [m], probs [m], noise [m]): the sparse q a sampled draft token after `length`
        tokens is drawn from, and the Exp(1) noise keyed to that position (argmax probs / noise
        is the sample)."""
        p = st.params
        q = sampling_probs(logits.unsqueeze(0), torch.tensor([p.temperature]), torch.tensor([p.top_k]),
                           torch.tensor([p.top_p], dtype=torch.float64))[0]
        ids, probs = truncate_top_m(q, self.top_m)
        return ids, probs, randomness.exp_noise(st.seed, length - st.prompt_len, ids.shape[0], randomness.DRAFT)

    def _pick(self, st: SeqState, logits: torch.Tensor, draft: Draft, length: int) -> bool:
        """Append the next draft token to `draft` unless the confidence stop says no.

        `length` is the length of the sequence the token follows (context + drafts before it):
        it keys the random numbers, so a token drafted ahead equals the one drafted later.
        """
        if st.params.greedy:
            top = torch.topk(torch.softmax(logits.float(), dim=-1), 2)
            if float(top.values[0]) < self.confidence_threshold:
                return False
            draft.tokens.append(int(top.indices[0]))
            if draft.beliefs is not None:
                draft.beliefs.append((float(top.values[0]), int(top.indices[1]), float(top.values[1])))
            return True
        ids, probs, noise = self._sparse_q(st, logits, length)
        chosen = sample_from(probs, noise)
        token = int(ids[chosen])
        if float(probs[0]) < self.confidence_threshold:
            return False
        draft.tokens.append(token)
        if draft.beliefs is not None and ids.shape[0] > 1:
            other = 1 if int(chosen) == 0 else 0  # q's likeliest token other than the one drawn
            draft.beliefs.append((float(probs[chosen]), int(ids[other]), float(probs[other])))
        draft.q_ids = ids.view(1, -1) if draft.q_ids is None else torch.cat([draft.q_ids, ids.view(1, -1)])
        draft.q_probs = probs.view(1, -1) if draft.q_probs is None else torch.cat([draft.q_probs, probs.view(1, -1)])
        return True


def _decayed(mean: float | None, sample: float) -> float:
    """A time's decayed mean after one more sample (TIME_EMA), the sample itself at first."""
    return sample if mean is None else (1 - TIME_EMA) * mean + TIME_EMA * sample


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
