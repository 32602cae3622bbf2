"""Shared test settings."""

import torch

# Tests exercise small models whose ops are too short to gain from threads; one thread keeps
# them fast and leaves the other core free.
torch.set_num_threads(1)
