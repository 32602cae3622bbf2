"""Shared test settings."""

import os

import torch

# Triton kernels run on the CPU only in interpreter mode, which must be chosen before triton is
# first imported; with a GPU the kernels run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests exercise small models whose ops are too short to gain from threads; one thread keeps
# them fast and leaves the other core free.
torch.set_num_threads(1)
