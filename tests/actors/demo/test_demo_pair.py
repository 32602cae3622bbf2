"""The shipped demo pair: present, the advertised sizes, trained only on training files, lossless."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.actors.demo import WEIGHTS_DIR, demo_path
from specserve.actors.demo.corpus import is_held_out, iter_python_files, stdlib_root
from specserve.actors.engine.build import load_tokenizer
from specserve.actors.engine.draft_length import DraftLengthConfig
from specserve.actors.engine.drafters import ModelDrafter
from specserve.actors.engine.engine import SpeculativeEngine
from specserve.actors.engine.request import make_params
from specserve.actors.engine.runner import ModelRunner, RunnerConfig
from specserve.cluster.bench_local import code_prompts, held_out_files

MAX_TOKENS = 32


def n_params(path) -> int:
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())


def test_demo_pair_has_the_advertised_sizes_and_fits_in_40_mb():
    assert 8e6 <= n_params(demo_path("target")) <= 30e6
    assert 1e6 <= n_params(demo_path("drafter")) <= 3e6
    total = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total <= 40 * 2**20


def test_training_manifest_excludes_every_held_out_file_and_benchmark_prompts_come_from_outside_it():
    trained = set((WEIGHTS_DIR / "train_manifest.txt").read_text().split())
    assert len(trained) > 1000
    assert not any(is_held_out(f) for f in trained)
    held = [f.relpath for f in held_out_files()]
    assert held and not trained.intersection(held)
    all_files = {f.relpath for f in iter_python_files(stdlib_root())}
    assert trained <= all_files  # the manifest names real files of this stdlib


@pytest.fixture(scope="module")
def pair():
    tok = load_tokenizer(demo_path("target"))
    target = AutoModelForCausalLM.from_pretrained(demo_path("target"), dtype=torch.float64).eval()
    drafter = AutoModelForCausalLM.from_pretrained(demo_path("drafter"), dtype=torch.float64).eval()
    prompts = [p[-n:] for p, n in zip(code_prompts(tok, 3), (12, 40, 70))]  # mixed lengths
    with torch.no_grad():
        want = []
        for p in prompts:
            ids = torch.tensor([p])
            out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                  do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
            want.append(out[0, len(p):].tolist())
    return tok, target, drafter, prompts, want


def _engine(pair, policy: DraftLengthConfig) -> SpeculativeEngine:
    tok, target, drafter, _, _ = pair
    rc = RunnerConfig(max_num_seqs=2, max_seq_len=256, dtype=torch.float64)
    # separate module objects per engine: the runner owns the model's attention setting
    t = AutoModelForCausalLM.from_pretrained(demo_path("target"), dtype=torch.float64).eval()
    d = AutoModelForCausalLM.from_pretrained(demo_path("drafter"), dtype=torch.float64).eval()
    return SpeculativeEngine(ModelRunner(t, rc), tok, ModelDrafter(ModelRunner(d, rc), confidence_threshold=0.0),
                             policy)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8])
def test_demo_pair_greedy_speculation_equals_transformers_generate(pair, k):
    _, _, _, prompts, want = pair
    eng = _engine(pair, DraftLengthConfig(k_max=k, fixed_k=k))
    results = eng.generate(prompts, make_params(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [r.token_ids for r in results] == want
    assert sum(r.stats.accepted for r in results) > 0


def test_demo_pair_adaptive_draft_length_equals_transformers_generate(pair):
    _, _, _, prompts, want = pair
    results = _engine(pair, DraftLengthConfig()).generate(prompts, make_params(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [r.token_ids for r in results] == want
