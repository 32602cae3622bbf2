"""The demo recipe's training loop resumes from its checkpoints exactly where it stopped."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specserve.actors.demo.recipe import Batches, ce_loss, train_for

TOKENS = torch.randint(0, 64, (4096,), generator=torch.Generator().manual_seed(0))


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64))


def stream() -> Batches:
    return Batches(TOKENS, 16, 4, torch.Generator().manual_seed(1))


def killed_after(calls: int):
    """ce_loss that dies (as a killed process would) on call `calls` + 1."""
    seen = []

    def loss(model, batch):
        if len(seen) == calls:
            raise KeyboardInterrupt
        seen.append(1)
        return ce_loss(model, batch)
    return loss


def train(model, loss, path, steps=6):
    return train_for(model, loss, stream(), 60.0, 1e-2, "test", checkpoint=path, every_s=0.0, max_steps=steps)


def test_a_run_killed_mid_stage_resumes_to_the_same_weights_as_one_never_stopped(tmp_path):
    whole = tiny()
    _, steps = train(whole, ce_loss, None)
    assert steps == 6
    path = tmp_path / "stage.pt"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), killed_after(4), path)
    assert torch.load(path, weights_only=False)["step"] == 4
    resumed = tiny()  # a fresh process: initial weights again, then the checkpoint
    _, steps = train(resumed, ce_loss, path)
    assert steps == 6
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_finished_stage_is_not_trained_again_and_a_raised_budget_trains_on(tmp_path):
    path = tmp_path / "stage.pt"
    first = tiny()
    train(first, ce_loss, path, steps=3)
    again = tiny()
    _, steps = train(again, ce_loss, path, steps=3)
    assert steps == 3
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    _, steps = train(tiny(), ce_loss, path, steps=5)
    assert steps == 5 and torch.load(path, weights_only=False)["step"] == 5


def test_distinct_4gram_share_tells_a_loop_from_varied_text():
    from specserve.actors.demo.recipe import distinct_4gram_share

    assert distinct_4gram_share(list(range(20))) == 1.0
    assert distinct_4gram_share([1, 2] * 10) == pytest.approx(2 / 17)
    assert distinct_4gram_share([1, 2, 3]) == 1.0  # no 4-gram at all


def test_the_code_corpus_holds_out_a_tenth_of_each_root_and_benchmarks_skip_what_a_pair_trained_on(monkeypatch):
    from specserve.actors.demo import corpus

    train, held = corpus.code_split()
    site_train = [f for f in train if f.relpath.startswith(corpus.SITE_PREFIX)]
    site_held = [f for f in held if f.relpath.startswith(corpus.SITE_PREFIX)]
    assert site_train and site_held  # this machine has installed packages' sources
    assert not any(corpus.is_held_out(f.relpath) for f in train)
    assert all(corpus.is_held_out(f.relpath) for f in held)
    assert 0.05 < len(site_held) / (len(site_held) + len(site_train)) < 0.15
    # a pair trained on the code corpus: the benchmarks' unseen third-party code leaves its files out
    trained = frozenset(f.relpath for f in train)
    monkeypatch.setattr(corpus, "trained_files", lambda: trained)
    unseen = corpus.third_party_files(limit=500)
    assert unseen and not any(corpus.SITE_PREFIX + f.relpath in trained for f in unseen)
