"""Tiny random-init float64 models of every supported family, and engines built on them.

float64 keeps the runner and transformers' own forward equal to ~1e-15, so an argmax never
flips on a numerical near-tie and greedy outputs can be compared token for token.
"""

from __future__ import annotations

import copy

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, GraniteConfig, LlamaConfig,
                          MistralConfig, MixtralConfig, Olmo2Config, Phi3Config, Qwen2Config, Qwen3Config,
                          Qwen3MoeConfig)

from specserve.actors.engine.draft_length import CostModel, DraftLengthConfig
from specserve.actors.engine.drafters import BaseDrafter
from specserve.actors.engine.engine import SpeculativeEngine
from specserve.actors.engine.runner import ModelRunner, RunnerConfig
from specserve.actors.engine.tree_drafting import TreeDrafter

VOCAB = 96
WINDOW = 6  # sliding window, shorter than the test sequences so it changes the logits
NO_SPECIAL_TOKENS = dict(eos_token_id=None, bos_token_id=None, pad_token_id=None)  # nothing stops early


def family_config(family: str, layers: int = 2, vocab: int = VOCAB, **overrides):
    """A tiny config of `family` (a `model_type`); each exercises what sets its family apart.

    Llama uses GQA; Qwen2, Qwen3, Qwen3-MoE, Mistral, Mixtral and Phi-3 a sliding window (Qwen's
    from layer 1 on); Gemma 2 and 3 alternate sliding and global layers, and Gemma 2 soft-caps
    attention scores and final logits at values the test model's scores and logits reach; Granite scales embeddings, residuals, attention and logits; Phi-3 rotates
    half of each head.
    """
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=64, **NO_SPECIAL_TOKENS)
    moe = dict(experts_implementation="eager")  # grouped_mm, the default, takes no float64
    windowed = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    alternating = dict(head_dim=8, num_key_value_heads=2, sliding_window=WINDOW, query_pre_attn_scalar=8,
                       layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)])
    builders = {
        "llama": lambda: LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": lambda: Qwen2Config(num_key_value_heads=2, **windowed, **common),
        "qwen3": lambda: Qwen3Config(num_key_value_heads=2, head_dim=8, **windowed, **common),
        "qwen3_moe": lambda: Qwen3MoeConfig(num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=16, norm_topk_prob=True, **moe, **windowed,
                                            **common),
        "mistral": lambda: MistralConfig(num_key_value_heads=1, sliding_window=WINDOW, **common),
        "mixtral": lambda: MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                         sliding_window=WINDOW, **moe, **common),
        # weights 5x the usual init, so that scores and logits reach the caps
        "gemma2": lambda: Gemma2Config(attn_logit_softcapping=0.5, final_logit_softcapping=2.0, initializer_range=0.1,
                                       **alternating, **common),
        "gemma3_text": lambda: Gemma3TextConfig(**alternating, **common),
        "phi3": lambda: Phi3Config(num_key_value_heads=2, sliding_window=WINDOW, partial_rotary_factor=0.5,
                                   **common),
        "olmo2": lambda: Olmo2Config(num_key_value_heads=2, **common),
        "granite": lambda: GraniteConfig(num_key_value_heads=2, embedding_multiplier=4.0, residual_multiplier=0.5,
                                         attention_multiplier=0.25, logits_scaling=2.0, **common),
        "gpt2": lambda: GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                                   **NO_SPECIAL_TOKENS),
    }
    if family not in builders:
        raise ValueError(family)
    cfg = builders[family]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


FAMILIES = ("llama", "qwen2", "mistral", "gpt2")  # the families every engine test runs on
# every supported family (test_families.py)
ALL_FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "mixtral", "gemma2", "gemma3_text", "phi3",
                "olmo2", "granite", "gpt2")


# transformers' sdpa path cannot soft-cap scores (it refuses Gemma 2); eager softmaxes in float32,
# so the other families' references take sdpa, exact in float64
REFERENCE_ATTN = {"gemma2": "eager"}


def build_model(config, seed: int, attn: str | None = None):
    """A float64 model with its own copy of `config` (ModelRunner rewrites the config it gets).

    attn: transformers' attention implementation (default: REFERENCE_ATTN, else sdpa)."""
    torch.manual_seed(seed)
    attn = attn or REFERENCE_ATTN.get(config.model_type, "sdpa")
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn).double().eval()


def clone(model, attn: str = "sdpa"):
    """Same weights, separate module and config."""
    twin = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation=attn).double().eval()
    twin.load_state_dict(model.state_dict())
    return twin


def runner(model, max_num_seqs: int = 4, max_seq_len: int = 128, lean: bool = False) -> ModelRunner:
    """A float64 runner over a clone of `model`, so `model` stays a plain transformers reference.

    lean: chain forwards through LeanForward (Llama, Qwen2, Mistral) instead of transformers' modules."""
    cfg = RunnerConfig(max_num_seqs=max_num_seqs, max_seq_len=max_seq_len, dtype=torch.float64, lean=lean)
    return ModelRunner(clone(model, attn="eager"), cfg)  # (eager: every family has it; the runner sets its own)


@torch.no_grad()
def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    """transformers' own forward over the whole sequence.  # [len(tokens), vocab]"""
    return model(torch.tensor([tokens])).logits[0]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt`."""
    ids = torch.tensor([prompt])
    # an explicit mask: otherwise transformers treats every token equal to pad_token_id as padding
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class AlwaysDraftCost(CostModel):
    """Drafting and round trips are free and verification takes constant time, so the policy
    drafts k_max every step (and always waits for remote drafts).

    The real cost model measures wall time; tests that need a known draft length replace it.
    """

    def observe_draft(self, tokens: int, seconds: float, remote: bool = False) -> None:
        pass

    def observe_rtt(self, seconds: float) -> None:
        pass

    def observe_verify(self, n: int, seconds: float) -> None:
        pass

    def step_time(self, k: int, local: bool = False) -> float:
        return 1.0

    def knows_plain(self) -> bool:
        return True

    def longest_measured(self) -> int:
        return 1 << 30


def always_drafting_engine(target: ModelRunner, drafter: BaseDrafter | None, k_max: int,
                           tokenizer=None) -> SpeculativeEngine:
    """An engine whose drafts are k_max long whenever max_tokens leaves room (alpha held at its prior)."""
    policy = DraftLengthConfig(k_max=k_max, alpha_ema=0.0)
    engine = SpeculativeEngine(target, tokenizer, drafter, policy=policy)
    engine.cost = AlwaysDraftCost(policy)
    return engine


def record_draft_lengths(drafter: BaseDrafter) -> list[int]:
    """Make `drafter` append the length of every draft it proposes to the returned list."""
    lengths: list[int] = []
    propose = drafter.propose

    def recording(reqs):
        drafts = propose(reqs)
        lengths.extend(len(d.tokens) for d in drafts)
        return drafts

    drafter.propose = recording
    return lengths


def record_drafts(drafter: BaseDrafter) -> list:
    """Make `drafter` append every Draft it proposes to the returned list."""
    drafts: list = []
    propose = drafter.propose

    def recording(reqs):
        out = propose(reqs)
        drafts.extend(out)
        return out

    drafter.propose = recording
    return drafts


def tree_engine(target, drafter: TreeDrafter, depth: int, nodes: int, lean: bool = False) -> SpeculativeEngine:
    """An engine that asks for trees of `nodes` tokens and depth `depth` whenever there is room."""
    policy = DraftLengthConfig(k_max=depth, alpha_ema=0.0, tree_nodes=nodes)
    engine = SpeculativeEngine(runner(target, lean=lean), None, drafter, policy=policy)
    engine.cost = AlwaysDraftCost(policy)
    return engine
