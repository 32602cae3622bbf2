"""Synthetic traffic: records whose target is a tiny random Llama "teacher", and tiny students.

A random-init tiny model is nearly uniform over its 96 tokens (top-8 mass ~0.1), which would
make every top-8 record a near-uniform guess. The teacher's output layer is scaled up so its
distributions are peaked (top-8 mass ~0.9) and depend on the context, like a real target's.
"""

from __future__ import annotations

import time

import torch

from specserve.actors.distill.records import TrafficRecord

from ..engine.tiny import VOCAB, build_model, family_config

TOP_K = 8
K = 4  # draft tokens per record
SHARPEN = 30.0  # teacher logit scale


def tiny_llama(seed: int, layers: int = 1) -> torch.nn.Module:
    """A float32 random-init tiny Llama (vocab 96): a student, or a live drafter."""
    return build_model(family_config("llama", layers=layers), seed=seed).float()


def teacher(seed: int) -> torch.nn.Module:
    """A tiny Llama with peaked, context-dependent next-token distributions."""
    model = build_model(family_config("llama", layers=2), seed=seed).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPEN)
    return model


@torch.no_grad()
def teacher_records(model: torch.nn.Module, n: int, seed: int, k: int = K, top_k: int = TOP_K,
                    context_len: tuple[int, int] = (4, 12)) -> list[TrafficRecord]:
    """n records over random contexts and drafts: `model`'s top-k at each verified position,
    with random accept lengths (the test of a loss or a gate does not need real verdicts)."""
    gen = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(n):
        c = int(torch.randint(context_len[0], context_len[1] + 1, (), generator=gen))
        tokens = torch.randint(0, VOCAB, (c + k,), generator=gen)
        p = torch.softmax(model(input_ids=tokens[None]).logits[0, c - 1:], dim=-1)  # [k + 1, vocab]
        probs, ids = torch.topk(p, top_k, dim=-1)
        accepted = int(torch.randint(0, k + 1, (), generator=gen))
        records.append(TrafficRecord(tuple(tokens[:c].tolist()), tuple(tokens[c:].tolist()),
                                     tuple(map(tuple, ids.tolist())), tuple(map(tuple, probs.tolist())),
                                     accepted, "v0", time.time()))
    return records
