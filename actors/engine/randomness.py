"""Random numbers indexed by (request seed, output position, stream).

Each random number a sampled request consumes is keyed by where it is used: the uniform that
tests a chain draft token (its output position), the uniform that tests a tree node (the step's
first output position and the node), the noise that samples a step's recovered or bonus token
(the step's first output position: one draw per step, known before the verdict so a fused
kernel can take it), the noise the drafter used to sample its draft there. Drawing them from
generators keyed this way (not from one stream consumed step by step) makes a seeded request's
output independent of what else is in the batch.
"""

from __future__ import annotations

import torch

ACCEPT, SAMPLE, DRAFT, NODE = 0, 1, 2, 3  # streams (NODE + i: tree node i)
_MASK = 2**63 - 1


def _generator(seed: int, position: int, stream: int) -> torch.Generator:
    mixed = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & _MASK
    gen = torch.Generator()
    gen.manual_seed(mixed)
    return gen


def uniforms(seed: int, start: int, count: int) -> torch.Tensor:
    """U(0, 1) for the accept tests at positions start .. start+count-1.  # [count]"""
    return torch.cat([torch.rand(1, generator=_generator(seed, start + i, ACCEPT)) for i in range(count)]) \
        if count else torch.zeros(0)


def node_uniforms(seed: int, start: int, count: int) -> torch.Tensor:
    """U(0, 1) for the accept tests of tree nodes 0 .. count-1 of the step starting at `start`.  # [count]"""
    return torch.cat([torch.rand(1, generator=_generator(seed, start, NODE + i)) for i in range(count)]) \
        if count else torch.zeros(0)


def exp_noise(seed: int, position: int, size: int, stream: int = SAMPLE) -> torch.Tensor:
    """Exp(1) noise for sampling the token at `position`.  # [size]"""
    return torch.empty(size).exponential_(generator=_generator(seed, position, stream))


def fresh_seed() -> int:
    """A random seed for requests that did not give one."""
    return int(torch.randint(0, 2**62, (1,)).item())
