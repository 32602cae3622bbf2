"""Finished requests shared between verifier replicas, for their suffix indexes.

A verifier's suffix drafter (actors/engine/suffix.py) learns from the requests it finished;
`SuffixShare`, one named Ray actor per cluster, passes finished requests' token ids between
the verifier replicas of an application, so a request on replica B drafts from the traffic
replica A served. It holds them bounded in total tokens and in age (oldest out first), keyed
by a running number; each replica publishes its own and fetches the others' since its cursor,
once a second, off the hot path (`SuffixSync`). Only token ids cross, never text, only where
the traffic tap allows recording traffic (`distill.enabled`), sampled at its rate, and nothing
is logged. If the actor is gone a replica keeps drafting from its local index.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time

import ray

from specserve.actors.registry import NAMESPACE

log = logging.getLogger(__name__)
SHARE_NAME = "specserve-suffix-share"


class SuffixShare:
    """The cluster's recent finished requests, as token ids (see module docstring)."""

    def __init__(self, max_tokens: int = 262_144, max_age_s: float = 3600.0):
        self.max_tokens, self.max_age_s = max_tokens, max_age_s
        self._entries: collections.deque = collections.deque()  # (number, app, replica, tokens, time)
        self._tokens = 0
        self._next = 0

    def publish(self, app: str, replica: str, requests: list[list[int]]) -> None:
        """Add finished requests of `replica` (of application `app`)."""
        now = time.monotonic()
        for tokens in requests:
            tokens = list(tokens)[-self.max_tokens:]
            self._entries.append((self._next, app, replica, tokens, now))
            self._next += 1
            self._tokens += len(tokens)
        self._evict(now)

    def since(self, app: str, replica: str, cursor: int) -> tuple[list[list[int]], int]:
        """Requests of `app` numbered from `cursor` on that other replicas published, and the
        cursor to ask from next time."""
        self._evict(time.monotonic())
        out = [e[3] for e in self._entries if e[0] >= cursor and e[1] == app and e[2] != replica]
        return out, self._next

    def stats(self) -> dict:
        return {"requests": len(self._entries), "tokens": self._tokens}

    def _evict(self, now: float) -> None:
        while self._entries and (self._tokens > self.max_tokens or now - self._entries[0][4] > self.max_age_s):
            self._tokens -= len(self._entries.popleft()[3])


def get_share(max_tokens: int = 262_144, max_age_s: float = 3600.0):
    """The cluster's SuffixShare actor, started (detached) if it is not running."""
    actor = ray.remote(num_cpus=0, max_restarts=-1)(SuffixShare).options(
        name=SHARE_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True)
    return actor.remote(max_tokens, max_age_s)


class SuffixSync:
    """Once a second: publish this replica's finished requests (a `sample_rate` share of them)
    and hand the other replicas' to `add_finished`. Runs on its own daemon thread."""

    def __init__(self, app: str, replica: str, add_finished, sample_rate: float = 1.0, every_s: float = 1.0,
                 share=None):
        self.app, self.replica, self.add_finished = app, replica, add_finished
        self.sample_rate, self.every_s = sample_rate, every_s
        self._share = share
        self._outbox: list[list[int]] = []
        self._lock = threading.Lock()
        self._cursor = 0
        self.received = 0
        self._running = True
        self.thread = threading.Thread(target=self._run, name="suffix-sync", daemon=True)
        self.thread.start()

    def finished(self, tokens: list[int]) -> None:
        """A request this replica finished (prompt + output token ids)."""
        if random.random() < self.sample_rate:
            with self._lock:
                self._outbox.append(list(tokens))

    def stop(self) -> None:
        self._running = False

    def _run(self) -> None:
        while self._running:
            time.sleep(self.every_s)
            try:
                self.sync_once()
            except Exception as e:  # the actor restarting or gone: local drafting goes on
                log.warning("suffix share unavailable: %s", e)
                self._share = None

    def sync_once(self) -> None:
        """One exchange with the share actor (what the thread does every `every_s`)."""
        with self._lock:
            out, self._outbox = self._outbox, []
        share = self._share = self._share or get_share()
        if out:
            ray.get(share.publish.remote(self.app, self.replica, out), timeout=10)
        requests, self._cursor = ray.get(share.since.remote(self.app, self.replica, self._cursor), timeout=10)
        for tokens in requests:
            self.add_finished(tokens)
        self.received += len(requests)
