"""Shared test settings."""

import os

import pytest
import torch

# Triton kernels run on the CPU only in interpreter mode, which must be chosen before triton is
# first imported; with a GPU the kernels run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests exercise small models whose ops are too short to gain from threads; one thread keeps
# them fast and leaves the other core free.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """With a GPU, Triton runs for real and cannot take the CPU tensors of the interpreter tests:
    those run on GPU-less machines (CI), the `gpu` tests here (`pytest -m gpu`)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (no GPU)")
    for item in items:
        if "triton_cpu" in item.keywords and "gpu" not in item.keywords:
            item.add_marker(skip)
