"""The distillation loop: train a copy of the drafter toward the target on replayed traffic.

Plain torch on a transformers causal LM; the distiller job wraps it (Ray, publishing, gate).
One step: sample records from the replay buffer, collate them, run the drafter over the rows
(no KV cache: each row is one full forward), take its logits at the supervised positions and
minimise the weighted KD loss against the target's recorded top-k.
"""

from __future__ import annotations

import torch

from specserve.actors.distill.buffer import ReplayBuffer
from specserve.actors.distill.losses import LossKind, kd_loss
from specserve.actors.distill.records import TrainBatch, batch_records


def supervised_logits(model: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
    """The model's next-token logits at the batch's supervised positions.  # [n, vocab]

    The vocabulary projection runs at those positions only: a row has a few drafted positions
    among its `max_len`, and over a drafter's large vocabulary the projection of every position
    (and its backward) costs more than the decoder layers (the demo drafter: 8192 x 192 against
    two layers of 192). `batch` must already be on the model's device.
    """
    hidden = model.base_model(input_ids=batch.input_ids).last_hidden_state  # [b, L, hidden]
    return model.get_output_embeddings()(hidden[batch.rows, batch.cols])


def distill_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, buffer: ReplayBuffer, steps: int,
                  batch_size: int, kind: LossKind, vocab: int, max_len: int,
                  generator: torch.Generator | None = None, rejected_weight: float = 3.0,
                  teacher_temperature: float = 1.0) -> list[float]:
    """Run `steps` optimizer steps of KD on records sampled from `buffer`; the loss of each step.

    The model trains in train mode and gets its caller's mode back. `vocab` is the width of
    the model's logits (the records' target ids must lie below it).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    losses = []
    for _ in range(steps):
        batch = batch_records(buffer.sample(batch_size, generator), vocab, max_len, rejected_weight,
                              teacher_temperature=teacher_temperature).to(device)
        loss = kd_loss(kind, batch.targets, supervised_logits(model, batch), batch.weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    model.train(was_training)
    # one host sync for the whole run, not one per step
    return torch.stack(losses).tolist() if losses else []
