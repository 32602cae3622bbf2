"""The verifier side of the Drafting stream: remote drafter replicas behind the drafter protocol.

`RemoteDrafterPool` is a drafter to the engine (start / propose / verdict / stop), but each
sequence's drafts come from a drafter replica over a gRPC stream (one stream per replica,
multiplexed by sequence id). A drafter can only cost speed:

- `propose` waits for drafts at most `deadline_s`; a sequence whose draft is late is verified
  without drafts this step (a late draft is recognised by counting answers and thrown away);
- a sequence that misses `max_misses` deadlines in a row, or whose drafter says it does not
  know it, is detached and later started again on a drafter (possibly another one) with its
  whole context;
- a broken stream (replica dead or scaled away) detaches all its sequences at once and keeps
  its address out of the choice for `retry_s`;
- a sequence whose drafter missed more than `catch_up_wait` tokens (steps it drafted nothing
  for: speculation was off, e.g. until a probe, or the pool drafted by prompt lookup) sends it
  their verdicts without waiting for the draft that follows them: the drafter feeds the missed
  tokens while the verifier runs its step, and drafts from the next step on, instead of the
  whole batch waiting for that feed;
- while a drafter prefills a sequence attached less than PREFILL_GRACE_S ago, its other
  sequences' drafts may wait behind that prefill: a late one is neither a rejected draft nor a
  miss, and a timely one's wait is no sample of the round trip.
Suffix lookup (`lookup_min_n` > 0; actors/engine/suffix.py, prompt lookup its special case)
needs no model, so the pool does it itself: where a sequence's last `lookup_min_n` or more
tokens occurred before in it or in the sequences this verifier finished (`add_finished` takes
those of other replicas too), its draft is what most often followed them, with no round trip,
and its drafter is not asked this step. The tokens the verifier
kept of such a draft reach the drafter with its next request, like those of steps without
speculation: all of them in one Verdict (`then_tokens`).
Nothing a drafter does changes what the verifier emits: drafts are only ever proposals.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from specserve.actors import hops
from specserve.actors.convert import draft_from_pb, start_pb, stop_pb, verdict_pb
from specserve.actors.engine.drafters import (
    BaseDrafter, Draft, DraftRequest, lookup_draft, suffix_draft, suffix_lookup,
)
from specserve.actors.engine.request import SamplingParams
from specserve.actors.engine.suffix import SuffixConfig
from specserve.actors.security import TlsFiles, secure_channel
from specserve.v1 import drafting_pb2_grpc

log = logging.getLogger(__name__)
_CLOSE = object()


@dataclass(frozen=True)
class DrafterEndpoint:
    """A drafter replica's draft server, as the registry lists it."""

    address: str  # host:port
    node_id: str = ""
    load: int = 0  # live sequences
    weight_version: str = ""


class _Link:
    """One Drafting stream to one drafter replica; a reader thread hands drafts to the pool."""

    def __init__(self, address: str, on_draft: Callable, on_broken: Callable, tls: TlsFiles | None = None):
        self.address = address
        self.broken = False
        self._sendq: queue.SimpleQueue = queue.SimpleQueue()
        self._channel = secure_channel(address, tls, "security.internal_tls")
        self._call = drafting_pb2_grpc.DraftingStub(self._channel).Draft(self._outgoing())
        self._on_draft, self._on_broken = on_draft, on_broken
        threading.Thread(target=self._read, name=f"draft-link-{address}", daemon=True).start()

    def send(self, msg) -> None:
        if not self.broken:
            hops.mark("pool.send")
            self._sendq.put(msg)

    def _outgoing(self):
        """The stream's requests, as gRPC's thread takes them from the send queue."""
        for msg in iter(self._sendq.get, _CLOSE):
            hops.mark("grpc.take")
            yield msg

    def close(self) -> None:
        self._sendq.put(_CLOSE)
        self._call.cancel()
        self._channel.close()

    def _read(self) -> None:
        try:
            for msg in self._call:
                hops.mark("reader.got")
                self._on_draft(self, msg)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                log.warning("draft stream to %s broke: %s", self.address, e.code().name)
        except Exception:
            log.exception("draft stream to %s failed", self.address)
        finally:
            self.broken = True
            self._on_broken(self)


@dataclass
class _Remote:
    """Where a sequence's drafts come from."""

    link: _Link | None = None
    outstanding: int = 0  # Starts/Verdicts sent and not yet answered
    # not yet sent: (accepted, next_token, path, then_tokens) of the drafter's last draft, and the
    # tokens of later steps it drafted nothing for; or only those tokens (accepted = 0)
    verdict: tuple | None = None
    asked: bool = False  # the drafter was asked for a draft this step (its verdict is on that draft)
    looked_up: bool = False  # this step's draft came from the pool's prompt lookup (until its verdict)
    last_looked_up: bool = False  # the last draft came from the pool's prompt lookup (for `version`)
    waiting: bool = False
    k: int = 0  # draft length asked for in the awaited round
    nodes: int = 0  # tree budget asked for in the awaited round (0: a chain)
    result: Draft | None = None
    sent_at: float = 0.0
    starting: bool = False  # the drafter may still be prefilling: misses don't count, no cost samples
    answered: bool = False  # the drafter has answered this sequence since it was (re)started
    attached_at: float = 0.0  # when its Start was sent
    fed_missed: bool = False  # the awaited draft follows tokens of steps it drafted nothing for (Draft.fed_missed)
    misses: int = 0
    retry_at: float = 0.0
    version: str = ""
    # the speculation cache: drafts the drafter pushed, by the state they assume (context length,
    # last token), with their weight version; `decided`: context length drafts were last chosen at
    cache: dict = field(default_factory=dict)
    decided: int = 0


class RemoteDrafterPool(BaseDrafter):
    """Drafts from drafter replicas listed by `endpoints()` (see module docstring)."""

    name = "remote"
    remote = True
    PREFILL_GRACE_S = 1.0  # how long a drafter's prefill of a new sequence excuses its late drafts
    LOOKUP_VERSION = "prompt-lookup"  # the drafter version reported for drafts from prompt lookup

    def __init__(self, endpoints: Callable[[], list[DrafterEndpoint]], vocab_size: int,
                 deadline_s: float = 0.05, node_id: str = "", max_misses: int = 3, retry_s: float = 1.0,
                 tls: TlsFiles | None = None, catch_up_wait: int = 16, lookup_min_n: int = 0,
                 suffix: SuffixConfig | None = None, speculation_cache: bool = True, speculation_outcomes: int = 3):
        super().__init__()
        self.speculation_cache = speculation_cache  # ask drafters to push drafts ahead (Start.push)
        self.speculation_outcomes = speculation_outcomes  # ... for at most this many verdict outcomes per draft
        self.cached_outcomes = 0  # outcomes with a pushed draft in the cache when a step's draft was chosen
        self.cache_decisions = 0  # ... over this many steps of sequences with a drafter
        self.cache_hits = 0  # drafts taken from the speculation cache (no round trip)
        self.pushes = 0  # Speculations received
        self.stale_pushes = 0  # ... that came for a state already decided (late, or a verdict ruled them out)
        self.waits: collections.deque = collections.deque(maxlen=4096)  # seconds propose waited for remote drafts
        self.wait_count = 0  # drafting steps whose wait was recorded
        self.lookup = suffix_lookup(lookup_min_n, suffix)
        self.on_finished: Callable[[list[int]], None] | None = None  # also hand finished requests here
        self.lookup_drafts = 0  # drafts the pool made itself by suffix lookup
        self._local: dict[int, Draft] | None = None  # this step's lookup drafts (local_drafts), for propose
        self.endpoints = endpoints
        self.vocab_size = vocab_size
        self.deadline_s = deadline_s
        self.node_id = node_id
        self.max_misses = max_misses
        self.retry_s = retry_s
        self.tls = tls
        self.catch_up_wait = catch_up_wait  # longest catch-up (tokens missed) a draft is awaited after
        self.remote: dict[int, _Remote] = {}
        self.links: dict[str, _Link] = {}
        self.bad_until: dict[str, float] = {}
        self.overheads: collections.deque = collections.deque(maxlen=4096)  # round trip minus drafting, s
        self.misses = 0
        self._fresh_overheads: list[float] = []
        self._cond = threading.Condition()

    @property
    def drafts_locally(self) -> bool:
        """Whether the pool drafts by suffix lookup itself (pushed drafts come only while the
        replica is asked, so they do not count)."""
        return self.lookup is not None

    # -- the drafter protocol --------------------------------------------------------------------

    def start(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        with self._cond:
            super().start(seq_id, prompt_ids, params)
            self.remote[seq_id] = _Remote()
            if self.lookup is not None:
                self.lookup.drop(seq_id)

    def verdict(self, seq_id: int, accepted: int, next_token: int, path: list[int] | None = None) -> None:
        with self._cond:
            kept = self.seqs[seq_id].last_draft[:accepted]
            super().verdict(seq_id, accepted, next_token, path)
            rs = self.remote[seq_id]
            if rs.link is not None:
                if rs.asked:  # a verdict on the drafter's own draft
                    rs.verdict = (accepted, next_token, path, [])
                else:  # it drafted nothing: the tokens the verifier emitted
                    tokens = (kept if rs.looked_up else []) + [next_token]
                    if rs.verdict is None:
                        rs.verdict = (0, tokens[0], None, tokens[1:])
                    else:
                        rs.verdict[3].extend(tokens)
            rs.asked = rs.looked_up = False

    def stop(self, seq_id: int) -> None:
        with self._cond:
            rs = self.remote.pop(seq_id, None)
            if rs is not None and rs.link is not None:
                rs.link.send(stop_pb(seq_id))
            if self.lookup is not None:
                self.lookup.drop(seq_id)
            super().stop(seq_id)

    def finished(self, seq_id: int, tokens: list[int]) -> None:
        """The request's tokens join the suffix index: the next similar request drafts from them
        (and, with `on_finished` set, other replicas' next ones: actors/suffix_share.py)."""
        with self._cond:
            if self.lookup is not None:
                self.lookup.finish(seq_id, tokens)
        if self.lookup is not None and self.on_finished is not None:
            self.on_finished(tokens)

    def add_finished(self, tokens: list[int]) -> None:
        """A request finished elsewhere (another replica): its token ids join the suffix index."""
        with self._cond:
            if self.lookup is not None:
                self.lookup.add_finished(tokens)

    def local_drafts(self, reqs: list[DraftRequest]) -> dict[int, Draft]:
        """This step's drafts that need no round trip, by seq_id: prompt lookup, else a draft
        the drafter pushed for the state the sequence is in now; `propose` returns them."""
        with self._cond:
            self._local = {r.seq_id: d for r in reqs
                           if (d := self._look_up(r) or self._from_cache(r)) is not None}
            for r in reqs:  # drafts for this step are decided: pushes for it from now on are stale
                self._decide(r.seq_id)
            return dict(self._local)

    def propose(self, reqs: list[DraftRequest]) -> list[Draft]:
        """Ask each sequence's drafter for k tokens (unless prompt lookup drafted it, here or in
        `local_drafts` just before); wait for the answers until the deadline."""
        with self._cond:
            now = time.monotonic()
            if self._local is None:
                self.local_drafts(reqs)
            local, self._local = self._local, None
            for r in reqs:
                if r.seq_id not in local:
                    self._request(r.seq_id, r.k, r.nodes, now)
            deadline = now + self.deadline_s
            awaited = [self.remote[r.seq_id] for r in reqs if self.remote[r.seq_id].waiting]
            prefilling = self._prefilling(now)
            while any(rs.result is None and rs.link is not None for rs in awaited):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if awaited:
                hops.mark("engine.woke")
            if any(r.k > 0 for r in reqs):
                self.waits.append(time.monotonic() - now)
                self.wait_count += 1
            return [local.get(r.seq_id) or self._collect(r, prefilling) for r in reqs]

    def _look_up(self, r: DraftRequest) -> Draft | None:
        """The sequence's draft by prompt lookup (chains only), or None to ask its drafter."""
        if self.lookup is None or r.k <= 0 or r.nodes > 0:
            return None
        st = self.seqs[r.seq_id]
        tokens = suffix_draft(self.lookup, r.seq_id, st, r.k)
        if not tokens:
            return None
        rs = self.remote[r.seq_id]
        rs.waiting, rs.result, rs.looked_up, rs.last_looked_up = False, None, True, True
        st.last_draft = tokens
        self.lookup_drafts += 1
        return lookup_draft(tokens, r.k, st.params)  # made here: no drafter time, no round trip

    def _from_cache(self, r: DraftRequest) -> Draft | None:
        """The draft the drafter pushed for the sequence's state now, or None. Taking it sends
        the verdict on the last draft with the tokens taken, which the drafter does not answer."""
        rs = self.remote[r.seq_id]
        st = self.seqs[r.seq_id]
        entry = rs.cache.get((len(st.context), st.context[-1])) if r.k > 0 and r.nodes == 0 else None
        # pushes assume the verdict on the drafter's own last chain draft, nothing in between
        if entry is None or rs.link is None or rs.verdict is None or rs.verdict[2] is not None or rs.verdict[3]:
            return None
        draft, version = entry
        accepted, nxt, _, _ = rs.verdict
        take = min(r.k, len(draft.tokens))
        rs.link.send(verdict_pb(r.seq_id, accepted, nxt, take, taken=draft.tokens[:take]))
        rs.verdict, rs.asked, rs.waiting, rs.result = None, True, False, None
        rs.looked_up, rs.last_looked_up, rs.version = False, False, version
        st.last_draft = draft.tokens[:take]
        self.cache_hits += 1
        q = (None, None) if draft.q_ids is None else (draft.q_ids[:take], draft.q_probs[:take])
        return Draft(draft.tokens[:take], *q, requested=r.k)  # drafted meanwhile: no drafter time, no round trip

    def _decide(self, seq_id: int) -> None:
        rs = self.remote.get(seq_id)
        if rs is not None:
            rs.decided = len(self.seqs[seq_id].context)
            if rs.link is not None and self.speculation_cache:
                self.cached_outcomes += len(rs.cache)
                self.cache_decisions += 1
            rs.cache.clear()

    def _prefilling(self, now: float) -> set[int]:
        """Links (by id) whose drafter is still prefilling a sequence attached less than
        PREFILL_GRACE_S ago: a draft from it may wait behind that prefill."""
        return {id(rs.link) for rs in self.remote.values()
                if rs.link is not None and not rs.answered and now - rs.attached_at < self.PREFILL_GRACE_S}

    def version(self, seq_id: int) -> str:
        """Weight version of the drafter whose last draft this sequence got (LOOKUP_VERSION: the
        pool's prompt lookup)."""
        rs = self.remote.get(seq_id)
        if rs is None:
            return ""
        return self.LOOKUP_VERSION if rs.last_looked_up else rs.version

    def take_overheads(self) -> list[float]:
        """Round-trip overheads measured since the last call (for metrics)."""
        with self._cond:
            fresh, self._fresh_overheads = self._fresh_overheads, []
        return fresh

    def close(self) -> None:
        """Close every stream (the verifier is shutting down)."""
        with self._cond:
            links, self.links = list(self.links.values()), {}
        for link in links:
            link.close()

    # -- requests and answers (under the lock) ----------------------------------------------------

    def _request(self, seq_id: int, k: int, nodes: int, now: float) -> None:
        rs = self.remote[seq_id]
        rs.waiting, rs.result, rs.k, rs.nodes, rs.fed_missed = False, None, k, nodes, False
        if rs.link is None and now >= rs.retry_at and k > 0:  # no drafter work while speculation is off
            self._attach(seq_id, rs, k, nodes)
        elif rs.link is not None and rs.verdict is not None and k > 0:
            # tokens of steps it drafted nothing for wait in the verifier: the drafter catches up
            # in one message (and one forward) when drafts are wanted again, and costs the
            # CPUs it may share with the verifier nothing meanwhile
            accepted, nxt, path, then = rs.verdict
            rs.link.send(verdict_pb(seq_id, accepted, nxt, k, path, nodes, then))
            rs.outstanding += 1
            rs.asked = True
            rs.fed_missed = bool(then)  # more than a draft step feeds: fed before it drafts
            # a long catch-up is fed while the verifier steps without this sequence's draft (its
            # round counts as not drafted, like a Start's), not while the whole batch waits;
            # seeded sampling always waits: its tokens must not depend on timing
            long = len(then) + 1 > self.catch_up_wait and not self.seqs[seq_id].params.seeded_sampling
            rs.verdict, rs.starting, rs.waiting = None, not rs.answered, not long
        rs.sent_at = now

    def _attach(self, seq_id: int, rs: _Remote, k: int, nodes: int) -> None:
        link = self._choose_link()
        if link is None:
            rs.retry_at = time.monotonic() + self.retry_s
            return
        st = self.seqs[seq_id]
        link.send(start_pb(seq_id, st.context, st.params, st.seed, k, nodes, push=self.speculation_cache,
                           push_outcomes=self.speculation_outcomes))
        rs.link, rs.outstanding, rs.verdict, rs.misses, rs.answered, rs.asked = link, 1, None, 0, False, True
        rs.attached_at = time.monotonic()
        # the first draft waits for the drafter's prefill of the whole context: the batch does
        # not wait for it (its draft arrives late and is dropped), except for seeded sampling,
        # whose tokens depend on which steps had drafts and must not depend on timing
        rs.starting, rs.waiting = True, k > 0 and st.params.seeded_sampling

    def _choose_link(self) -> _Link | None:
        """Least-loaded live drafter, same node preferred."""
        now = time.monotonic()
        try:
            eps = [e for e in self.endpoints() if self.bad_until.get(e.address, 0) <= now]
        except Exception:
            log.exception("cannot list drafters")
            return None
        if not eps:
            return None
        ours = collections.Counter(rs.link.address for rs in self.remote.values() if rs.link is not None)
        best = min(eps, key=lambda e: (e.node_id != self.node_id, ours[e.address] + e.load, e.address))
        link = self.links.get(best.address)
        if link is None or link.broken:
            link = self.links[best.address] = _Link(best.address, self._on_draft, self._on_broken, self.tls)
        return link

    def _collect(self, r: DraftRequest, prefilling: set[int]) -> Draft:
        rs = self.remote[r.seq_id]
        # while its drafter prefills sequences a probe just attached (their Starts), a draft may
        # wait behind that prefill: a late one is neither a rejected draft nor a slow drafter, and a
        # timely one's wait is no sample of the round trip
        excused = rs.link is not None and id(rs.link) in prefilling
        # a round the verifier did not wait for (a Start still prefilling, no drafter) did not
        # speculate: requested=0 keeps it from counting as a failed accept trial
        draft = rs.result if rs.result is not None else \
            Draft([], requested=r.k if rs.waiting and not excused else 0)
        if excused and rs.result is not None:
            draft.catch_up = True
        if rs.waiting and rs.result is None and rs.link is not None:
            self.misses += 1
            if not rs.starting and not excused:
                rs.misses += 1
                if rs.misses >= self.max_misses:
                    log.info("sequence %d: drafter %s too slow, detaching", r.seq_id, rs.link.address)
                    self._detach(r.seq_id, rs)
        elif rs.result is not None:
            rs.misses = 0
        rs.waiting, rs.result, rs.last_looked_up = False, None, False
        self.seqs[r.seq_id].last_draft = draft.tokens
        return draft

    def _detach(self, seq_id: int, rs: _Remote, retry_s: float | None = None) -> None:
        if rs.link is not None and not rs.link.broken:
            rs.link.send(stop_pb(seq_id))
        rs.link, rs.outstanding, rs.verdict, rs.asked = None, 0, None, False
        rs.cache.clear()
        rs.retry_at = time.monotonic() + (self.retry_s if retry_s is None else retry_s)

    # -- reader threads -------------------------------------------------------------------------

    def _on_draft(self, link: _Link, msg) -> None:
        if msg.HasField("speculation"):
            return self._on_speculation(link, msg.speculation)
        pb = msg.draft
        with self._cond:
            rs = self.remote.get(pb.sequence_id)
            if rs is None or rs.link is not link:
                return  # a finished or re-attached sequence
            rs.outstanding -= 1
            rs.answered = rs.answered or not pb.unknown_sequence
            if pb.unknown_sequence:
                self._detach(pb.sequence_id, rs, retry_s=0.2)
            elif rs.outstanding == 0 and rs.waiting:
                sampled = not self.seqs[pb.sequence_id].params.greedy
                rs.result = draft_from_pb(pb, rs.k, self.vocab_size, sampled, rs.nodes)
                rs.version = pb.weight_version
                rs.result.fed_missed = rs.fed_missed
                if rs.starting:  # its wait includes the drafter's prefill: not a cost sample
                    rs.result.forwards, rs.result.seconds = 0, None
                else:
                    overhead = max(0.0, time.monotonic() - rs.sent_at - pb.draft_seconds)
                    self.overheads.append(overhead)
                    self._fresh_overheads.append(overhead)
            self._cond.notify_all()

    def _on_speculation(self, link: _Link, pb) -> None:
        """A pushed draft: kept for the state it assumes, unless that state is decided already
        (the push came late, or after the sequence ended or moved to another drafter)."""
        with self._cond:
            rs = self.remote.get(pb.sequence_id)
            if rs is None or rs.link is not link:
                return
            self.pushes += 1
            if pb.context_length <= rs.decided:
                self.stale_pushes += 1
                return
            sampled = not self.seqs[pb.sequence_id].params.greedy
            draft = draft_from_pb(pb.draft, len(pb.draft.tokens), self.vocab_size, sampled)
            if draft.tokens:
                rs.cache[(pb.context_length, pb.last_token)] = (draft, pb.draft.weight_version)

    def _on_broken(self, link: _Link) -> None:
        with self._cond:
            self.bad_until[link.address] = time.monotonic() + 5 * self.retry_s
            if self.links.get(link.address) is link:
                del self.links[link.address]
            for seq_id, rs in self.remote.items():
                if rs.link is link:
                    self._detach(seq_id, rs, retry_s=0.0)
            self._cond.notify_all()
