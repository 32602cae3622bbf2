"""Which implementation of a kernel runs: Triton on CUDA, the torch reference elsewhere.

Every kernel in this package has a readable torch reference and a Triton implementation. The
backend is chosen per call from the tensors' device and a setting (`kernels` in the verifier
and drafter config):

  auto    Triton when the tensors are on a CUDA device, else the torch reference (default);
  torch   always the reference;
  triton  always Triton (on the CPU only under TRITON_INTERPRET=1: how tests compare the two).

The Triton modules are imported on first use, so a CPU-only install never imports triton.
"""

from __future__ import annotations

from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


def use_triton(device: torch.device, backend: Backend) -> bool:
    """True when `backend` on `device` means the Triton implementation."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is not one of {BACKENDS}")
    return backend == "triton" or (backend == "auto" and device.type == "cuda")


def verify_chain(*args, backend: Backend = "auto"):
    """Chain rejection sampling; arguments as `specserve.kernels.verify.verify_chain`."""
    if use_triton(args[0].device, backend):
        from specserve.kernels.triton_sampling import verify_chain_triton

        return verify_chain_triton(*args)
    from specserve.kernels.verify import verify_chain as reference

    return reference(*args)


def verify_tree(*args, backend: Backend = "auto"):
    """Tree verification sampling; arguments as `specserve.kernels.tree.verify_tree`."""
    if use_triton(args[0].device, backend):
        from specserve.kernels.triton_sampling import verify_tree_triton

        return verify_tree_triton(*args)
    from specserve.kernels.tree import verify_tree as reference

    return reference(*args)


def tree_attention(*args, backend: Backend = "auto", **kwargs):
    """Attention of a verification block over the paged cache; as `kernels.tree_attention`."""
    if use_triton(args[0].device, backend):
        from specserve.kernels.triton_attention import tree_attention_triton

        return tree_attention_triton(*args, **kwargs)
    from specserve.kernels.tree_attention import tree_attention_reference

    return tree_attention_reference(*args, **kwargs)


def compact_kv(*args, backend: Backend = "auto"):
    """Move the accepted path's cache entries into place; as `kernels.compaction`."""
    if use_triton(args[0].device, backend):
        from specserve.kernels.triton_compaction import compact_kv_triton

        return compact_kv_triton(*args)
    from specserve.kernels.compaction import compact_kv_reference

    return compact_kv_reference(*args)
