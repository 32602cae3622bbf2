"""The paged attention path (the Triton kernel reading cache rows in place, run here in
interpreter mode) gives the same logits as the torch path, for chains and token trees, in every
supported family."""

from __future__ import annotations

import pytest
import torch

from specserve.actors.engine.runner import ModelRunner, RunnerConfig
from specserve.kernels.tree import tree_depth, tree_mask

from .tiny import FAMILIES, build_model, clone, family_config

PARENTS = torch.tensor([[-1, 0, 0, 1, 1, 2, 3], [-1, 0, 1, 2, -1, -1, -1]])  # a tree, and a chain of 4 + padding


def float_runner(model, kernels: str) -> ModelRunner:
    cfg = RunnerConfig(max_num_seqs=3, max_seq_len=64, dtype=torch.float32, kernels=kernels)
    return ModelRunner(clone(model).float(), cfg)


def tree_step(r: ModelRunner) -> torch.Tensor:
    """Prefill two sequences of different lengths (slots out of order), then one tree block."""
    gen = torch.Generator().manual_seed(0)
    dummy, a, b = r.add_sequence(), r.add_sequence(), r.add_sequence()
    r.forward([b], torch.randint(0, 96, (1, 9), generator=gen))
    r.forward([a], torch.randint(0, 96, (1, 4), generator=gen))
    tokens = torch.randint(0, 96, (2, PARENTS.shape[1]), generator=gen)
    return r.forward([b, a], tokens, [7, 4], tree_mask(PARENTS), tree_depth(PARENTS))


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_triton_attention_matches_the_torch_path(family):
    model = build_model(family_config(family), seed=0)
    paged, plain = float_runner(model, "triton"), float_runner(model, "torch")
    assert paged.paged and not plain.paged
    got, want = tree_step(paged), tree_step(plain)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, :4], want[1, :4], atol=1e-4, rtol=1e-4)  # the chain's real positions
    assert not torch.allclose(got[0, 2], got[0, 1], atol=1e-3)  # siblings really differ
