"""The paged attention path (the Triton kernel reading cache rows in place, run here in
interpreter mode) gives the same logits as the torch path, for chains and token trees, in every
supported family."""

from __future__ import annotations

import pytest
import torch

from specserve.actors.engine.runner import ModelRunner, RunnerConfig
from specserve.kernels.tree import tree_depth, tree_mask

from .tiny import ALL_FAMILIES, FAMILIES, build_model, clone, family_config

pytestmark = pytest.mark.triton_cpu  # Triton on CPU tensors: interpreter mode (see tests/conftest.py)

PARENTS = torch.tensor([[-1, 0, 0, 1, 1, 2, 3], [-1, 0, 1, 2, -1, -1, -1]])  # a tree, and a chain of 4 + padding


def float_runner(model, kernels: str) -> ModelRunner:
    cfg = RunnerConfig(max_num_seqs=3, max_seq_len=128, dtype=torch.float32, kernels=kernels)
    return ModelRunner(clone(model, attn="eager").float(), cfg)


def tree_step(r: ModelRunner, long_prompt: int = 9) -> torch.Tensor:
    """Prefill two sequences of different lengths (slots out of order), then one tree block."""
    gen = torch.Generator().manual_seed(0)
    _, a, b = r.add_sequence(), r.add_sequence(), r.add_sequence()  # slot 0 stays unused
    r.forward([b], torch.randint(0, 96, (1, long_prompt), generator=gen))
    r.forward([a], torch.randint(0, 96, (1, 4), generator=gen))
    tokens = torch.randint(0, 96, (2, PARENTS.shape[1]), generator=gen)
    return r.forward([b, a], tokens, [7, 4], tree_mask(PARENTS), tree_depth(PARENTS))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_paged_triton_attention_matches_the_torch_path(family):
    model = build_model(family_config(family), seed=0)
    paged, plain = float_runner(model, "triton"), float_runner(model, "torch")
    assert paged.paged == (family != "gemma2") and not plain.paged  # the kernel cannot soft-cap scores
    got, want = tree_step(paged), tree_step(plain)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, :4], want[1, :4], atol=1e-4, rtol=1e-4)  # the chain's real positions
    assert not torch.allclose(got[0, 2], got[0, 1], atol=1e-3)  # siblings really differ


def test_a_prefill_longer_than_the_kernel_block_takes_the_sdpa_path_and_decoding_continues():
    model = build_model(family_config("llama"), seed=0)
    paged, plain = float_runner(model, "triton"), float_runner(model, "torch")
    got, want = tree_step(paged, long_prompt=90), tree_step(plain, long_prompt=90)  # 90 > 64 positions
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_on_cuda_the_triton_path_matches_the_torch_path_and_tree_decoding_stays_greedy(family):
    from specserve.actors.engine.draft_length import DraftLengthConfig
    from specserve.actors.engine.engine import SpeculativeEngine
    from specserve.actors.engine.request import make_params
    from specserve.actors.engine.tree_drafting import TreeDrafter

    model = build_model(family_config(family), seed=0)

    def cuda_runner(kernels: str) -> ModelRunner:
        cfg = RunnerConfig(max_num_seqs=3, max_seq_len=64, dtype=torch.float32, device="cuda", kernels=kernels)
        return ModelRunner(clone(model).float().cuda(), cfg)

    got, want = tree_step(cuda_runner("auto")), tree_step(cuda_runner("torch"))
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-3)
    outputs = {}
    for kernels in ("auto", "torch"):
        drafter = TreeDrafter(cuda_runner(kernels), branching=3)
        engine = SpeculativeEngine(cuda_runner(kernels), None, drafter,
                                   DraftLengthConfig(k_max=3, fixed_k=3, tree_nodes=6), kernels=kernels)
        outputs[kernels] = [r.token_ids for r in engine.generate([[3, 41, 9, 88], [7]], make_params(max_tokens=16))]
        sampled = engine.generate([[3, 41, 9, 88], [7]], make_params(max_tokens=16, temperature=1.0, seed=3))
        assert [len(r.token_ids) for r in sampled] == [16, 16]  # the Triton samplers ran in the engine
    assert outputs["auto"] == outputs["torch"]
