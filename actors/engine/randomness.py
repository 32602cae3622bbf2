"""Random numbers indexed by (request seed, output position, stream).

Each random number a sampled request consumes belongs to one output position: the uniform that
tests a draft token there, the noise that samples the token emitted there, the noise the drafter
used to sample its draft there. Drawing them from a generator keyed by the position (not from
one stream consumed step by step) makes a seeded request's output independent of what else is
in the batch and of how its positions were grouped into blocks.
"""

from __future__ import annotations

import torch

ACCEPT, SAMPLE, DRAFT = 0, 1, 2  # streams
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


def exp_noise(seed: int, position: int, size: int, stream: int = SAMPLE) -> torch.Tensor:
    """Exp(1) noise for sampling the token at `position`.  # [size]"""
    return torch.empty(size).exponential_(generator=_generator(seed, position, stream))


def fresh_seed() -> int:
    """A random seed for requests that did not give one."""
    return int(torch.randint(0, 2**62, (1,)).item())
