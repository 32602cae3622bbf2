"""Traffic records: what the verifier saw for one verified draft block, and their training batches.

Positions of a block. The block followed `context` (prompt + generated so far, ending with the
pending token) and proposed draft tokens d_1..d_k. The verifier ran the target once over
context + d_1..d_k and so knows the target distribution p at k + 1 verified positions:
position i (0..k) is the distribution of the token AFTER context + d_1..d_i. Position i < k
is where d_{i+1} was compared against p; position k is where the bonus token comes from.
With `accepted` = a drafts kept, positions 0..a-1 agreed, position a (when a < k) is the first
rejected one, and positions a+1..k lie past the rejection.

In a training row (context + draft tokens) the logits at the column of the pending token
predict position 0 and the logits at the column of d_i predict position i.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch


@dataclass(frozen=True)
class TrafficRecord:
    """One verified draft block: the teacher signal for the drafter, free from verification."""

    context: Sequence[int]  # token ids the block followed, ending with the pending token (the tap: int32 array)
    draft: tuple[int, ...]  # draft tokens d_1..d_k
    target_ids: tuple[tuple[int, ...], ...]  # [k + 1][top_k] the target's top-k token ids, most likely first
    target_probs: tuple[tuple[float, ...], ...]  # [k + 1][top_k] their probabilities (not renormalised)
    accepted: int  # drafts the verifier kept (0..k)
    drafter_version: str  # weight version of the drafter that proposed the block
    created_s: float  # time.time() when recorded


@dataclass(frozen=True)
class TrainBatch:
    """Tensors for one distillation step over a batch of records.

    The n supervised positions of the whole batch are flattened: logits[rows, cols] are the
    drafter's predictions that targets[j] and weights[j] belong to.
    """

    input_ids: torch.Tensor  # [b, L] int64, context tail + draft tokens, right-padded
    rows: torch.Tensor  # [n] int64, batch row of each supervised position
    cols: torch.Tensor  # [n] int64, column whose next-token logits are supervised
    targets: torch.Tensor  # [n, vocab] float32, renormalised top-k p, zeros elsewhere
    weights: torch.Tensor  # [n] float32, loss weight of each position (position_weights)

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch on `device`."""
        return TrainBatch(*(t.to(device) for t in (self.input_ids, self.rows, self.cols, self.targets,
                                                   self.weights)))


def dense_targets(record: TrafficRecord, vocab: int) -> torch.Tensor:
    """The target's top-k at each verified position as dense rows.  # [k + 1, vocab]

    Each row is renormalised to sum to 1 over its top-k ids and is zero elsewhere: the mass
    outside the top-k was never recorded, so it is treated as unknown, not as spread out.
    """
    _check(record, vocab)
    ids = torch.tensor(record.target_ids, dtype=torch.long)  # [k + 1, top_k]
    probs = torch.tensor(record.target_probs, dtype=torch.float32)  # [k + 1, top_k]
    dense = torch.zeros(len(ids), vocab).scatter_add_(1, ids, probs)  # [k + 1, vocab]
    return dense / dense.sum(dim=-1, keepdim=True)


def position_weights(k: int, accepted: int, rejected_weight: float = 3.0,
                     after_rejection_weight: float = 1.0) -> list[float]:
    """Loss weight of each of the k + 1 verified positions of a block with `accepted` drafts.

    - positions 0..accepted-1 (the draft agreed with the target): 1;
    - position `accepted` when accepted < k (the first rejected position, where the drafter
      cost us the rest of the block): `rejected_weight`, the emphasis of Online Speculative
      Decoding on the drafter's mistakes;
    - positions after the rejection: `after_rejection_weight` (default 1). The target
      distribution there is exact (one verifier pass scored the whole block) for a prefix
      the drafter itself produced, so it is the drafter's own, on-policy state; it is
      never reached by the served sequence, which is why it gets no emphasis;
    - position k when every draft was accepted (the bonus position): 1.
    """
    if not 0 <= accepted <= k:
        raise ValueError(f"accepted={accepted} outside 0..{k}")
    weights = [1.0] * accepted + [rejected_weight if accepted < k else 1.0]
    return weights + [after_rejection_weight] * (k - accepted)


def sharpen(targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Target rows raised to 1/temperature and renormalised.  # [n, vocab]

    temperature 1 leaves p as recorded; below 1 moves mass toward each row's argmax, the only
    token that matters for greedy requests (-> 0: all of it), so a small drafter spends its
    capacity on the target's first choice rather than on the shape of its tail.
    """
    if temperature <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {temperature}")
    if temperature == 1.0:
        return targets
    peaked = targets / targets.amax(dim=-1, keepdim=True)  # in [0, 1]: no overflow for small T
    peaked = peaked ** (1.0 / temperature)
    return peaked / peaked.sum(dim=-1, keepdim=True)


def batch_records(records: Sequence[TrafficRecord], vocab: int, max_len: int, rejected_weight: float = 3.0,
                  after_rejection_weight: float = 1.0, pad_id: int = 0,
                  teacher_temperature: float = 1.0) -> TrainBatch:
    """Collate records into one training batch (see TrainBatch; weights from position_weights).

    A row is context + draft, truncated on the left to `max_len` tokens (the oldest context
    goes first; every supervised column survives since max_len >= k + 1 is required), then
    right-padded with `pad_id`. Targets are sharpened to `teacher_temperature` (sharpen). Right padding needs no attention mask: with causal attention
    no real token ever sees a pad that follows it, and pad columns are never supervised.
    """
    if not records:
        raise ValueError("no records to batch")
    rows = [_row(r, max_len) for r in records]  # (tokens, column of the pending token)
    input_ids = torch.full((len(rows), max(len(t) for t, _ in rows)), pad_id, dtype=torch.long)  # [b, L]
    row_idx, col_idx, weights = [], [], []
    for b, (record, (tokens, first)) in enumerate(zip(records, rows)):
        k = len(record.draft)
        input_ids[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        row_idx += [b] * (k + 1)
        col_idx += range(first, first + k + 1)
        weights += position_weights(k, record.accepted, rejected_weight, after_rejection_weight)
    targets = sharpen(torch.cat([dense_targets(r, vocab) for r in records]), teacher_temperature)  # [n, vocab]
    return TrainBatch(input_ids, torch.tensor(row_idx, dtype=torch.long), torch.tensor(col_idx, dtype=torch.long),
                      targets, torch.tensor(weights, dtype=torch.float32))


def _row(record: TrafficRecord, max_len: int) -> tuple[list[int], int]:
    """The record's tokens cut to max_len from the left, and the column of its pending token."""
    k = len(record.draft)
    if max_len < k + 1:
        raise ValueError(f"max_len={max_len} cannot hold the pending token and {k} draft tokens")
    tokens = list(record.context) + list(record.draft)
    cut = max(0, len(tokens) - max_len)
    return tokens[cut:], len(record.context) - 1 - cut


def _check(record: TrafficRecord, vocab: int) -> None:
    """Reject records whose parts disagree, at the training boundary (the tap stays cheap)."""
    n = len(record.draft) + 1
    if not record.context:
        raise ValueError("record has an empty context (it must end with the pending token)")
    if len(record.target_ids) != n or len(record.target_probs) != n:
        raise ValueError(f"record with {n - 1} drafts needs {n} target rows, has "
                         f"{len(record.target_ids)} ids / {len(record.target_probs)} probs")
    if any(not 0 <= i < vocab for row in record.target_ids for i in row):
        raise ValueError(f"record target ids outside the vocabulary of {vocab}")
    if any(sum(row) <= 0 for row in record.target_probs):
        raise ValueError("record has a target row with no probability mass")
