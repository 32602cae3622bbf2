"""The verifier's speculation cache over real gRPC streams: drafts pushed ahead are taken with
no round trip where their state comes, and nothing a push does (late, stale, twice for one
key, wrong, after the sequence ended, from a drafter that dies) changes an output."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from specserve.actors.convert import speculation_to_pb
from specserve.actors.engine.drafters import Draft, DraftRequest, ModelDrafter
from specserve.actors.engine.request import make_params

from .drafting import DraftServerThread
from .engine.tiny import build_model, family_config, hf_greedy, runner
from .test_remote_drafting import NEW_TOKENS, PROMPTS, remote_engine


@pytest.fixture(scope="module")
def models():
    target = build_model(family_config("llama"), seed=0)
    drafter = build_model(family_config("llama", layers=1), seed=1)
    return target, drafter, [hf_greedy(target, p, NEW_TOKENS) for p in PROMPTS]


def pushing_server(model, drafter_cls=ModelDrafter) -> DraftServerThread:
    return DraftServerThread(drafter_cls(runner(model, max_num_seqs=8), confidence_threshold=0.0), pipelined=True)


VERIFY_S = 0.02  # a verify step's time: a large target's, which the drafter's pushes beat


def slow_verifier(engine):
    """The engine's target takes VERIFY_S per forward, as a large model would: the tiny test
    target is as fast as its drafter, so no draft made ahead could be ready in time."""
    forward = engine.target.forward

    def slow(*args, **kwargs):
        time.sleep(VERIFY_S)
        return forward(*args, **kwargs)
    engine.target.forward = slow
    return engine


def generate(target, server, prompts=PROMPTS, until=lambda pool: True, attempts: int = 4, **pool_kwargs):
    """Every output of `prompts`, generated up to `attempts` times until `until(pool)` holds
    (whether a push arrives in time depends on the machine's load), and the pool."""
    engine, pool = remote_engine(target, [server], **pool_kwargs)
    slow_verifier(engine)
    outputs = []
    try:
        for _ in range(attempts):
            outputs.append([r.token_ids for r in engine.generate(prompts, make_params(max_tokens=NEW_TOKENS))])
            if until(pool):
                break
        return outputs, pool
    finally:
        pool.close()


def test_drafts_pushed_ahead_are_taken_from_the_cache_and_output_equals_transformers(models):
    """The target drafting for itself: every draft is accepted whole and the guessed token is
    right, so after a sequence's first steps its drafts can come from the cache."""
    target, _, want = models
    server = pushing_server(target)
    try:
        outputs, pool = generate(target, server, until=lambda pool: pool.cache_hits > 0)
    finally:
        server.stop()
    assert all(out == want for out in outputs)
    assert server.worker.pushes_sent > 0 and pool.pushes > 0
    assert pool.cache_hits > 0


def test_without_the_cache_nothing_is_pushed_and_output_is_the_same(models):
    target, _, want = models
    server = pushing_server(target)
    try:
        outputs, pool = generate(target, server, speculation_cache=False)
    finally:
        server.stop()
    assert outputs == [want]
    assert server.worker.pushes_sent == 0 and pool.cache_hits == 0


class HostilePushes(ModelDrafter):
    """Pushes its real drafts, then for each: the same key again with wrong tokens (the later
    push for a key wins), a push for a state already decided (the one before the last draft's
    verdict), and one for a state that cannot come."""

    def take_pushes(self):
        out = []
        for seq_id, length, last, draft in super().take_pushes():
            wrong = Draft([(t + 1) % 96 for t in draft.tokens], requested=draft.requested)
            out += [(seq_id, length, last, draft), (seq_id, length, last, wrong),
                    (seq_id, length - len(self.seqs[seq_id].last_draft) - 2, last, draft), (seq_id, length, (last + 7) % 96, wrong)]
        return out


def test_wrong_duplicate_and_stale_pushes_change_no_output(models):
    target, drafter, want = models
    server = pushing_server(target, HostilePushes)
    try:
        outputs, pool = generate(target, server, until=lambda pool: pool.cache_hits > 0 and pool.stale_pushes > 0)
    finally:
        server.stop()
    assert all(out == want for out in outputs)
    assert pool.cache_hits > 0  # wrong drafts were taken (the duplicates won) and rejected
    assert pool.stale_pushes > 0


def test_a_late_push_and_a_push_after_the_sequence_ended_are_dropped(models):
    target, drafter, _ = models
    server = pushing_server(drafter)
    engine, pool = remote_engine(target, [server])
    try:
        pool.start(0, PROMPTS[3], make_params(max_tokens=64))
        pool.local_drafts([DraftRequest(0, 2)])
        pool.propose([DraftRequest(0, 2)])  # attaches the sequence to the drafter
        link = pool.remote[0].link
        context = pool.seqs[0].context
        late = speculation_to_pb(0, len(context), context[-1], Draft([5, 6]), "v0", 0.0).speculation
        pool._on_speculation(link, late)  # for the state drafts were just decided at
        assert pool.stale_pushes == 1 and not pool.remote[0].cache
        pool.stop(0)
        pool._on_speculation(link, late)  # the sequence ended: ignored
        assert pool.pushes == 1
    finally:
        pool.close()
        server.stop()


class BranchingDrafter(ModelDrafter):
    """Drafts for every rejection outcome that fits before the verdict, however unlikely."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.branch_min_prob = 0.0


def jittered(model, scale: float = 0.1, seed: int = 3):
    """`model` with noise on its weights: a drafter that often agrees with it and, where it does
    not, often has its token second (so drafts for rejection outcomes get taken)."""
    near = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in near.parameters():
            w.add_(torch.randn(w.shape, generator=gen) * w.std().nan_to_num(0.0) * scale)
    return near


def test_drafts_pushed_for_rejection_outcomes_are_taken_and_output_equals_transformers(models):
    target, _, want = models
    server = DraftServerThread(BranchingDrafter(runner(jittered(target), max_num_seqs=8), confidence_threshold=0.0),
                               pipelined=True)
    try:
        outputs, pool = generate(target, server, until=lambda pool: server.worker.drafter.branch_hits > 0)
    finally:
        server.stop()
    assert all(out == want for out in outputs)
    drafter = server.worker.drafter
    assert drafter.branch_pushes > 0 and drafter.branch_hits > 0
    assert pool.cached_outcomes > pool.cache_decisions > 0  # more than one outcome covered per step


def test_a_drafter_killed_while_pushing_loses_no_request(models):
    target, _, want = models
    server = pushing_server(target)
    engine, pool = remote_engine(target, [server], deadline_s=0.5)
    slow_verifier(engine)
    results = {}
    worker = threading.Thread(target=lambda: results.update(
        out=engine.generate(PROMPTS * 2, make_params(max_tokens=NEW_TOKENS))))
    try:
        worker.start()
        end = time.monotonic() + 30
        while server.worker.pushes_sent < 3 and time.monotonic() < end:
            time.sleep(0.005)
        server.stop()  # mid-generation, pushes in flight
        worker.join(120)
    finally:
        pool.close()
    assert server.worker.pushes_sent >= 3
    assert [r.token_ids for r in results["out"]] == want * 2


# -- sampling through the cache keeps the target's distribution ------------------------------------

VOCAB, N, PROMPT, MAX_TOKENS = 8, 1000, [1, 5, 2], 5


def tiny_pair():
    from .engine.test_sampling_lossless import tiny_llama

    return tiny_llama(0, 2), tiny_llama(1, 1)


def exact_fourth_token(target) -> torch.Tensor:
    """p(4th generated token) = sum over the 8^3 first three tokens of their probability times
    the target's next-token distribution after them."""
    prefixes = torch.cartesian_prod(*[torch.arange(VOCAB)] * 3)  # [512, 3]
    weights = torch.ones(len(prefixes), dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            ids = torch.cat([torch.tensor(PROMPT).expand(len(prefixes), -1), prefixes[:, :i]], dim=1)
            p = torch.softmax(target(input_ids=ids).logits[:, -1].double(), -1)
            weights = weights * p[torch.arange(len(prefixes)), prefixes[:, i]]
        ids = torch.cat([torch.tensor(PROMPT).expand(len(prefixes), -1), prefixes], dim=1)
        last = torch.softmax(target(input_ids=ids).logits[:, -1].double(), -1)
    return (weights[:, None] * last).sum(0)


def cached_samples(drafter_kind: str = "self") -> tuple[torch.Tensor, int, int]:
    """The generated tokens of N seeded sampled requests drafted through a pushing draft
    server (k = 2, so a request's second block can come from the cache), the cache hits and the
    verdicts a draft for a rejection outcome was pushed for.

    `self`: the target drafts for itself (q = p): every draft is accepted, so a block's drafts
    come from the cache whenever the bonus token is the drafter's guess (its argmax). `sharper`:
    the target at half its temperature drafts (q = p^2, renormalised), with drafts pushed for
    every rejection outcome too: q overrates the token it drew, so rejections are common, and
    the residual the verifier then samples from favours q's next likeliest token, the one
    those drafts assume."""
    from specserve.actors.engine.draft_length import DraftLengthConfig
    from specserve.actors.engine.engine import SpeculativeEngine
    from specserve.actors.engine.runner import ModelRunner, RunnerConfig
    from specserve.actors.remote_drafter import RemoteDrafterPool

    target, _ = tiny_pair()
    drafter = copy.deepcopy(target)
    if drafter_kind == "sharper":
        with torch.no_grad():
            drafter.lm_head.weight.mul_(2.0)
    rc = RunnerConfig(max_num_seqs=64, max_seq_len=32, dtype=torch.float64, lean=True)
    cls = ModelDrafter if drafter_kind == "self" else BranchingDrafter
    server = DraftServerThread(cls(ModelRunner(copy.deepcopy(drafter), rc), confidence_threshold=0.0),
                               pipelined=True)
    pool = RemoteDrafterPool(lambda: [server.endpoint], VOCAB, deadline_s=5.0)
    try:
        engine = slow_verifier(SpeculativeEngine(ModelRunner(copy.deepcopy(target), rc), None, pool,
                                                 DraftLengthConfig(k_max=2, fixed_k=2)))
        params = [make_params(seed=i, temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True) for i in range(N)]
        results = engine.generate([PROMPT] * N, params)
    finally:
        pool.close()
        server.stop()
    return torch.tensor([r.token_ids for r in results]), pool.cache_hits, server.worker.drafter.branch_hits


def tv(samples: torch.Tensor, exact: torch.Tensor) -> float:
    emp = torch.bincount(samples, minlength=VOCAB).double() / len(samples)
    return 0.5 * float((emp - exact).abs().sum())


@pytest.mark.slow
@pytest.mark.parametrize("drafter_kind", ["self", "sharper"])
def test_sampling_through_the_speculation_cache_keeps_the_targets_distribution(drafter_kind):
    from .engine.test_sampling_lossless import exact_marginals, tv_bound

    target, _ = tiny_pair()
    samples, hits, branch_hits = cached_samples(drafter_kind)
    assert hits >= N // 10  # many second blocks came from the cache
    if drafter_kind == "sharper":
        assert branch_hits >= N // 50  # ... some after a rejection
    first, _ = exact_marginals(target, PROMPT)
    assert tv(samples[:, 0], first) < tv_bound(VOCAB, N)
    assert tv(samples[:, 3], exact_fourth_token(target)) < tv_bound(VOCAB, N)

