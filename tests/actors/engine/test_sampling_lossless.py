"""Speculative sampling through the whole engine keeps the target's distribution.

A tiny random target over an 8-token vocabulary and a different tiny random drafter. Thousands
of seeded requests of the same prompt are decoded speculatively; the empirical distributions of
the first and second generated tokens are compared with the exact ones computed from the
target. For K categories and N samples, E[TV] <= 0.5 * sqrt(K / N), and TV moves by at most 1/N
per sample, so by McDiarmid P(TV > E[TV] + t) <= exp(-2 N t^2); with t for delta = 1e-6 the
bound below is exceeded by a correct sampler with probability under one in a million.
"""

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import specserve.kernels.tree as tree_mod
import specserve.kernels.verify as verify_mod
from specserve.actors.engine.draft_length import DraftLengthConfig
from specserve.actors.engine.drafters import ModelDrafter
from specserve.actors.engine.engine import SpeculativeEngine
from specserve.actors.engine.request import make_params
from specserve.actors.engine.runner import ModelRunner, RunnerConfig
from specserve.actors.engine.tree_drafting import TreeDrafter
from specserve.kernels.sampling import sample_from

from ...kernels.test_tree import walk_without_residual

VOCAB, N, PROMPT = 8, 4000, [1, 5, 2]
REPEATING = [1, 5, 2, 1, 5]  # prompt lookup drafts 2, 1, 5 at the first step
PARAMS = dict(temperature=1.0, max_tokens=3)


def tv_bound(k: int, n: int, delta: float = 1e-6) -> float:
    return 0.5 * math.sqrt(k / n) + math.sqrt(math.log(1 / delta) / (2 * n))


def tiny_llama(seed: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, eos_token_id=None, bos_token_id=None,
                      pad_token_id=None, initializer_range=0.5)  # large init: peaked, varied distributions
    return LlamaForCausalLM(cfg).double().eval()


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0, 2), tiny_llama(1, 1)


def exact_marginals(target, prompt=PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    """p(first token) and p(second token) = sum_a p(a) p(b | a), from the target itself."""
    with torch.no_grad():
        first = torch.softmax(target(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
        second = sum(first[a] * torch.softmax(target(input_ids=torch.tensor([prompt + [a]])).logits[0, -1], -1)
                     for a in range(VOCAB))
    return first, second


def speculative_samples(target, drafter, tree: bool = False, lookup: int = 0,
                        prompt=PROMPT) -> tuple[torch.Tensor, int]:
    """First two tokens of N seeded speculative requests, and the number of drafted tokens.

    tree: token trees of 5 nodes, depth 3, up to 3 siblings drawn without replacement;
    lookup: the model drafter's prompt lookup (point-mass q) where this many tokens repeat.
    """
    rc = RunnerConfig(max_num_seqs=256, max_seq_len=32, dtype=torch.float64, lean=True)  # chains: lean forward
    t = copy.deepcopy(target)
    if tree:
        d = TreeDrafter(ModelRunner(copy.deepcopy(drafter), rc), branching=3)
        policy = DraftLengthConfig(k_max=3, fixed_k=3, tree_nodes=5)
    else:
        d = ModelDrafter(ModelRunner(copy.deepcopy(drafter), rc), confidence_threshold=0.0, lookup_min_n=lookup)
        policy = DraftLengthConfig(k_max=3, fixed_k=3)
    eng = SpeculativeEngine(ModelRunner(t, rc), None, d, policy)
    results = eng.generate([prompt] * N, [make_params(seed=i, **PARAMS) for i in range(N)])
    if lookup:
        assert d.lookup_drafts >= N  # every request's first block came from prompt lookup
    return torch.tensor([r.token_ids for r in results]), sum(r.stats.drafted for r in results)


def tv(samples: torch.Tensor, exact: torch.Tensor) -> float:
    emp = torch.bincount(samples, minlength=VOCAB).double() / len(samples)
    return 0.5 * float((emp - exact).abs().sum())


@pytest.mark.parametrize("tree, lookup, prompt", [(False, 0, PROMPT), (True, 0, PROMPT), (False, 1, REPEATING)],
                         ids=["chain", "tree", "chain-with-prompt-lookup"])
def test_speculative_sampling_matches_target_distribution(models, tree, lookup, prompt):
    target, drafter = models
    samples, drafted = speculative_samples(target, drafter, tree, lookup, prompt)
    first, second = exact_marginals(target, prompt)
    assert drafted >= 2 * N  # drafts were really proposed and verified
    assert tv(samples[:, 0], first) < tv_bound(VOCAB, N)
    assert tv(samples[:, 1], second) < tv_bound(VOCAB, N)


def _wrong_sample_next(p, q, num_accepted, draft_len, noise):
    """A classic bug: after a rejection, resample from p instead of the residual max(p - q, 0)."""
    return sample_from(p[torch.arange(p.shape[0]), num_accepted], noise)


def test_distribution_check_catches_a_wrong_sampler(models, monkeypatch):
    monkeypatch.setattr(verify_mod, "sample_next", _wrong_sample_next)
    target, drafter = models
    samples, _ = speculative_samples(target, drafter)
    first, second = exact_marginals(target)
    worst = max(tv(samples[:, 0], first), tv(samples[:, 1], second))
    assert worst > tv_bound(VOCAB, N)


def test_distribution_check_catches_a_wrong_tree_sampler(models, monkeypatch):
    monkeypatch.setattr(tree_mod, "_walk_sampled", walk_without_residual)
    target, drafter = models
    samples, _ = speculative_samples(target, drafter, tree=True)
    first, second = exact_marginals(target)
    worst = max(tv(samples[:, 0], first), tv(samples[:, 1], second))
    assert worst > tv_bound(VOCAB, N)
