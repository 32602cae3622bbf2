"""A suffix index that learns from traffic: drafts from the longest earlier match of a context.

In the spirit of SuffixDecoding (Oliaro et al. 2024): the index holds
  own contexts   each live sequence's prompt + output so far (grows as it decodes), and
  a global store the token ids of recently finished sequences (this replica's, or added from
               elsewhere with `add_finished`), bounded in total tokens and in age, oldest out first.
Terms:
  occurrence   a position t of a stream, with the n tokens before it (the n-gram) and the token at t
               (its continuation); a stream's last n-gram has no continuation and does not count
  match        the longest suffix of the queried context, of at most `max_match` tokens, that has
               an occurrence in the sequence's own context or in the global store
  counts       per continuation token, how many occurrences of the match it followed (own and global
               added up), and the stamp (indexing order) of its latest one
A draft is a chain: at each step the continuation with the highest count (ties: the latest) is
appended and the match is taken again over context + draft; the chain stops when the product of
each step's empirical probability (count of the chosen / all occurrences of the match) falls below
`min_prob`, or at `spec_factor * match length` tokens (a longer match drafts further), or at k.
Prompt lookup is the special case with no global store, max_match 4, min_prob 0 and no length
limit, except that it copies the latest occurrence's continuation where this takes the most
frequent one.

The data structure: per n in 1..max_match, a hash table from an n-gram to its continuation
counts (flat n-gram tables rather than a trie: one dict lookup per level, no node objects). An
n-gram's key is exact, not a hash: its tokens (+1) packed KEY_BITS apiece into one int, the last
token lowest, so the key of a stream's last n tokens is the key of its last max_match tokens
masked to its low n * KEY_BITS bits, and appending a token is a shift. Indexing a token costs
max_match masks and table updates; a draft costs a few lookups per drafted token where the match
goes on, at most max_match where it shortens. An n-gram with one continuation token (most deep
ones) holds one packed int, not a dict. Memory: at most max_match entries per indexed token, so
bounding the global store's tokens bounds its memory (`entries` counts them).
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from typing import Callable

STAMP_BITS = 40  # a count's low bits: the stamp of its latest occurrence (ties go to the latest)
TOKEN_BITS = 24  # a single continuation's low bits: its token id (vocabularies up to 16M)
KEY_BITS = 24  # bits per token in an n-gram key (token id + 1; 0 would alias a shorter n-gram)
_STAMP_MASK = (1 << STAMP_BITS) - 1
_TOKEN_MASK = (1 << TOKEN_BITS) - 1
_COUNT_SHIFT = STAMP_BITS + TOKEN_BITS


@dataclass(frozen=True)
class SuffixConfig:
    """Knobs of the suffix index; the defaults need no tuning (see cluster/config.py)."""

    # longest suffix matched: past 16 tokens a match is nearly always a copy already (and
    # spec_factor * 4 reaches k_max 8), while each level costs an entry per indexed token
    max_match: int = 16
    min_match: int = 1  # draft only where the match is at least this long (prompt lookup's n); 0: never
    # a draft is at most spec_factor * match length long: SuffixDecoding's alpha (1-4 in its paper);
    # 2 lets a 1-token match draft 2 and a 4-token match fill k_max 8
    spec_factor: float = 2.0
    min_prob: float = 0.1  # stop the chain where the product of step probabilities falls below this (SuffixDecoding's)
    # tokens of finished sequences the global store holds (0: none): ~2.1 KB each measured on
    # Python sources at max_match 16, so ~70 MB; 128 requests of 256 tokens
    max_tokens: int = 32768
    max_age_s: float = 3600.0  # finished sequences older than this leave the global store

    def __post_init__(self):
        if self.max_match < 1 or self.min_match < 0 or self.min_match > self.max_match:
            raise ValueError(f"need 0 <= min_match <= max_match and max_match >= 1, got {self}")

    def max_draft(self, match_len: int) -> int:
        """The longest draft a match of `match_len` tokens may start."""
        return math.ceil(self.spec_factor * match_len)


@dataclass(frozen=True)
class Match:
    """The longest match of a context and its continuation counts ({token: (count, stamp)})."""

    length: int
    counts: dict[int, tuple[int, int]]

    @property
    def total(self) -> int:
        return sum(c for c, _ in self.counts.values())

    def best(self) -> int:
        """The continuation with the highest count, the latest among equals."""
        return max(self.counts, key=lambda t: self.counts[t])


_MASKS = [(1 << (KEY_BITS * n)) - 1 for n in range(65)]  # _MASKS[n]: the key of the last n tokens


def tail_key(tokens: list[int], end: int, depth: int) -> int:
    """The key of tokens[end-depth:end] (fewer where the stream is shorter)."""
    key = 0
    for tok in tokens[max(0, end - depth) : end]:
        key = key << KEY_BITS | (tok + 1)
    return key


class Continuations:
    """An n-gram's continuation counts once it has more than one continuation token: {token:
    count << STAMP_BITS | stamp}, their total count, and the best token (highest count, latest
    among equals: the highest packed value), kept up to date so a draft step costs O(1)."""

    __slots__ = ("packed", "total", "best")

    def __init__(self, packed: dict[int, int]):
        self.packed = packed
        self.total = sum(v >> STAMP_BITS for v in packed.values())
        self.best = max(packed, key=packed.__getitem__)

    def add(self, x: int, stamp: int) -> bool:
        """One more occurrence of `x` (the latest); whether `x` is new here."""
        old = self.packed.get(x)
        packed = self.packed[x] = ((0 if old is None else old >> STAMP_BITS) + 1) << STAMP_BITS | stamp
        self.total += 1
        if packed > self.packed[self.best]:
            self.best = x
        return old is None

    def remove(self, x: int) -> bool:
        """One occurrence of `x` fewer (the oldest: the stamps kept stay right); whether `x` left."""
        gone = self.packed[x] >> STAMP_BITS == 1
        if gone:
            del self.packed[x]
        else:
            self.packed[x] -= 1 << STAMP_BITS
        self.total -= 1
        if x == self.best:  # only here can another token have become the best: find it
            self.best = max(self.packed, key=self.packed.__getitem__)
        return gone


class NgramTables:
    """Continuation counts of every n-gram (n = 1..depth) of the streams indexed into it.

    A value is a packed int `(count << STAMP_BITS | stamp) << TOKEN_BITS | token` while the n-gram
    has one continuation token (most deep n-grams), else its `Continuations`.
    """

    def __init__(self, depth: int):
        self.depth = depth
        self.tables: list[dict] = [{} for _ in range(depth)]  # tables[n - 1]: the n-grams
        self.entries = 0  # (n-gram, continuation token) pairs held

    def add(self, key: int, levels: int, x: int, stamp: int) -> None:
        """Index one occurrence: continuation `x` after the last `levels` n-grams of `key`."""
        for n in range(1, levels + 1):
            table, k = self.tables[n - 1], key & _MASKS[n]
            v = table.get(k)
            if v is None:
                table[k] = (1 << STAMP_BITS | stamp) << TOKEN_BITS | x
                self.entries += 1
            elif type(v) is not int:
                self.entries += v.add(x, stamp)
            elif v & _TOKEN_MASK == x:
                table[k] = ((v >> _COUNT_SHIFT) + 1 << STAMP_BITS | stamp) << TOKEN_BITS | x
            else:
                table[k] = Continuations({v & _TOKEN_MASK: v >> TOKEN_BITS, x: 1 << STAMP_BITS | stamp})
                self.entries += 1

    def remove(self, key: int, levels: int, x: int) -> None:
        """Forget the oldest indexed occurrence of continuation `x` after those n-grams."""
        for n in range(1, levels + 1):
            table, k = self.tables[n - 1], key & _MASKS[n]
            v = table[k]
            if type(v) is not int:
                self.entries -= v.remove(x)
                if len(v.packed) == 1:
                    [(tok, packed)] = v.packed.items()
                    table[k] = packed << TOKEN_BITS | tok
            elif v >> _COUNT_SHIFT == 1:
                del table[k]
                self.entries -= 1
            else:
                table[k] = v - (1 << _COUNT_SHIFT)

    def add_stream(self, tokens: list[int], start: int, stamps) -> None:
        """Index the occurrences at positions start.. of `tokens` (position 0 has no n-gram)."""
        start = max(start, 1)
        key = tail_key(tokens, start, self.depth)
        for t, stamp in zip(range(start, len(tokens)), stamps):
            self.add(key, min(t, self.depth), tokens[t], stamp)
            key = (key << KEY_BITS | (tokens[t] + 1)) & _MASKS[self.depth]

    def remove_stream(self, tokens: list[int]) -> None:
        """Forget every occurrence of a stream indexed with `add_stream`."""
        key = tail_key(tokens, 1, self.depth)
        for t in range(1, len(tokens)):
            self.remove(key, min(t, self.depth), tokens[t])
            key = (key << KEY_BITS | (tokens[t] + 1)) & _MASKS[self.depth]

    def get(self, n: int, key: int):
        """The raw value of the n-gram whose key is key's low n tokens (None: no occurrence)."""
        return self.tables[n - 1].get(key & _MASKS[n])


def longest(tables: list[NgramTables], key: int, top: int) -> int:
    """The longest n <= top whose n-gram (key's last n tokens) occurs in any of `tables` (0: none).
    An n-gram that occurs implies its shorter suffixes do, so the first hit from the top wins."""
    for n in range(top, 0, -1):
        k = key & _MASKS[n]
        for tab in tables:
            if k in tab.tables[n - 1]:
                return n
    return 0


def _items(v) -> list[tuple[int, int]] | dict:
    """(token, count << STAMP_BITS | stamp) pairs of a raw table value."""
    return [(v & _TOKEN_MASK, v >> TOKEN_BITS)] if type(v) is int else v.packed.items()


def merged_counts(values: list) -> dict[int, tuple[int, int]]:
    """One n-gram's raw values from several tables as {token: (count, latest stamp)}."""
    out: dict[int, tuple[int, int]] = {}
    for v in values:
        for tok, packed in _items(v):
            c, s = packed >> STAMP_BITS, packed & _STAMP_MASK
            old = out.get(tok)
            out[tok] = (c, s) if old is None else (old[0] + c, max(old[1], s))
    return out


def _best_and_total(v) -> tuple[int, int, int]:
    """(best token, its packed count, total count) of one raw table value."""
    if type(v) is int:
        return v & _TOKEN_MASK, v >> TOKEN_BITS, v >> _COUNT_SHIFT
    return v.best, v.packed[v.best], v.total


def choose(values: list) -> tuple[int, float]:
    """(the continuation with the highest count, latest among equals; its empirical probability)
    over one n-gram's raw values from one or two tables (the global store, the own context).

    Two tables: a token the smaller one lacks has its count in the larger one alone, so none
    beats the larger one's best; only the smaller one's tokens and that best are candidates."""
    if len(values) == 1:
        token, packed, total = _best_and_total(values[0])
        return token, (packed >> STAMP_BITS) / total
    small, large = sorted(values, key=lambda v: 1 if type(v) is int else len(v.packed))
    top, _, large_total = _best_and_total(large)
    merged = merged_counts([small, large] if type(large) is int else [small, _subset(large, small, top)])
    token = max(merged, key=merged.__getitem__)
    return token, merged[token][0] / (_best_and_total(small)[2] + large_total)


def _subset(large: Continuations, small, top: int) -> int | Continuations:
    """The part of `large` that can hold the merged best: the tokens of `small`, and its own best."""
    keep = {tok: large.packed[tok] for tok, _ in _items(small) if tok in large.packed}
    keep[top] = large.packed[top]
    return Continuations(keep) if len(keep) > 1 else keep[top] << TOKEN_BITS | top


def _extends(context: list[int], indexed: list[int]) -> bool:
    """Whether `context` goes on from `indexed` (checked at its last token: contexts only grow)."""
    n = len(indexed)
    return n <= len(context) and (n == 0 or context[n - 1] == indexed[-1])


@dataclass
class _Live:
    """A live sequence: its context so far (indexed) and its n-grams."""

    context: list[int]
    tables: NgramTables


@dataclass(frozen=True)
class _Finished:
    """A finished sequence in the global store."""

    tokens: list[int]
    added_at: float


class SuffixIndex:
    """Own contexts of live sequences and a bounded global store of finished ones (module docstring)."""

    def __init__(self, cfg: SuffixConfig = SuffixConfig(), clock: Callable[[], float] = time.monotonic):
        if cfg.max_match >= len(_MASKS):
            raise ValueError(f"max_match must be at most {len(_MASKS) - 1}")
        self.cfg = cfg
        self.clock = clock
        self.store = NgramTables(cfg.max_match)  # the global store's n-grams
        self.finished: collections.deque[_Finished] = collections.deque()
        self.store_tokens = 0  # tokens of the finished sequences held
        self.live: dict[int, _Live] = {}
        self._stamp = 0  # indexing order of occurrences: recency for ties

    # -- what goes in -----------------------------------------------------------------------------

    def sync(self, seq_id: int, context: list[int]) -> None:
        """Index what `context` added since the last call for this sequence (it only grows; a
        context that is not an extension of the indexed one is indexed afresh)."""
        live = self.live.get(seq_id)
        if live is None or not _extends(context, live.context):
            live = self.live[seq_id] = _Live([], NgramTables(self.cfg.max_match))
        done = len(live.context)
        if done == len(context):
            return
        live.context.extend(context[done:])
        live.tables.add_stream(live.context, done, self._stamps(len(context) - max(done, 1)))

    def drop(self, seq_id: int) -> None:
        """Forget a live sequence's own context."""
        self.live.pop(seq_id, None)

    def finish(self, seq_id: int, context: list[int] | None = None) -> None:
        """A sequence ended: its context (or `context`) joins the global store; its own index goes."""
        live = self.live.pop(seq_id, None)
        tokens = context if context is not None else live.context if live is not None else []
        self.add_finished(tokens)

    def add_finished(self, tokens: list[int]) -> None:
        """Add a finished sequence's token ids (from this replica or another) to the global store;
        evict the oldest ones beyond max_tokens or max_age_s. Longer than max_tokens: its tail."""
        self.evict()
        cap = self.cfg.max_tokens
        tokens = list(tokens[-cap:]) if cap > 0 else []
        if len(tokens) < 2:
            return
        while self.finished and self.store_tokens + len(tokens) > cap:
            self._evict_oldest()
        self.store.add_stream(tokens, 1, self._stamps(len(tokens) - 1))
        self.finished.append(_Finished(tokens, self.clock()))
        self.store_tokens += len(tokens)

    def evict(self) -> None:
        """Drop finished sequences older than max_age_s."""
        horizon = self.clock() - self.cfg.max_age_s
        while self.finished and self.finished[0].added_at < horizon:
            self._evict_oldest()

    def forget_finished(self) -> None:
        """Empty the global store."""
        while self.finished:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        entry = self.finished.popleft()
        self.store.remove_stream(entry.tokens)
        self.store_tokens -= len(entry.tokens)

    def _stamps(self, n: int) -> range:
        """The next n stamps."""
        first = self._stamp + 1
        self._stamp += n
        return range(first, first + n)

    # -- what comes out ---------------------------------------------------------------------------

    def _tables(self, seq_id: int, shared: bool = True) -> list[NgramTables]:
        live = self.live.get(seq_id)
        own = [] if live is None else [live.tables]
        return [self.store] + own if shared else own

    def match(self, seq_id: int, tokens: list[int]) -> Match:
        """The longest match of `tokens` in the sequence's own indexed context and the global
        store, with its continuation counts added up over both."""
        tables, depth = self._tables(seq_id), min(self.cfg.max_match, len(tokens))
        key = tail_key(tokens, len(tokens), depth)
        n = longest(tables, key, depth)
        values = [v for tab in tables if (v := tab.get(n, key)) is not None] if n else []
        return Match(n, merged_counts(values))

    def draft(self, seq_id: int, context: list[int], k: int, shared: bool = True) -> list[int]:
        """Up to k draft tokens after `context` (module docstring); [] where the match is shorter
        than min_match. Indexes the context first (`sync`). `shared` False: from the sequence's
        own context only (a seeded request, whose output must not depend on other traffic)."""
        cfg = self.cfg
        if k <= 0 or cfg.min_match == 0:
            return []
        self.sync(seq_id, context)
        tables, depth = self._tables(seq_id, shared), min(cfg.max_match, len(context))
        key = tail_key(context, len(context), depth)
        n = longest(tables, key, depth)
        if n < cfg.min_match or n == 0:
            return []
        limit, prob, out = min(k, cfg.max_draft(n)), 1.0, []
        while n and len(out) < limit:
            token, p = choose([v for tab in tables if (v := tab.get(n, key)) is not None])
            prob *= p
            if prob < cfg.min_prob:
                break
            out.append(token)
            # the new last min(n + 1, max_match) tokens: no longer match can exist than one more
            top = min(n + 1, cfg.max_match)
            key = (key & _MASKS[top - 1]) << KEY_BITS | (token + 1)
            n = longest(tables, key, top)
        return out

    @property
    def entries(self) -> int:
        """(n-gram, continuation) entries held by the global store and the live sequences."""
        return self.store.entries + sum(live.tables.entries for live in self.live.values())
