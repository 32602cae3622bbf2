"""ModelRunner: a Hugging Face causal LM driven with the project's KV cache and attention.

One code path for every supported architecture (SUPPORTED_MODEL_TYPES: the Llama, Qwen2/3,
Mistral/Mixtral, Gemma 2/3, Phi-3, OLMo 2, Granite and GPT-2 families): the model is
transformers' own class with `attn_implementation="specserve"`; we pass explicit position ids,
our `KVCache` as `past_key_values`, and our `BlockMask` through transformers' attention kwargs.
A forward takes several sequences of different cached lengths, each adding `n` new positions (a
verification block) under an arbitrary per-sequence mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from specserve.actors.engine.attention import ATTN_IMPLEMENTATION, BlockMask, PagedBlock  # importing registers it
from specserve.actors.engine import lean
from specserve.actors.engine.kv_cache import CacheShape, KVCache, StepLayout
from specserve.kernels import dispatch
from specserve.kernels.dispatch import Backend
from specserve.kernels.tree_attention import MAX_BLOCK as PAGED_MAX_BLOCK

# the `model_type`s of config.json that tests hold to transformers' own forward and generate
# (tests/actors/engine/test_families.py); Gemma 3 is its text model (`gemma3` is the multimodal one)
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "mixtral", "gemma2", "gemma3_text",
                         "phi3", "olmo2", "granite", "gpt2")


@dataclass(frozen=True)
class RunnerConfig:
    """Capacity of one runner."""

    max_num_seqs: int = 8  # sequences resident in the KV cache at once
    max_seq_len: int = 2048  # prompt + generated tokens per sequence
    kv_budget_bytes: int | None = None  # refuse to start when the cache would exceed this
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    kernels: Backend = "auto"  # torch reference or Triton for the cache kernels (kernels/dispatch.py)
    lean: bool = False  # forwards through LeanForward (actors/engine/lean.py) where the model allows


def check_supported(config, source: str = "the model") -> None:
    """Raise ValueError naming the model_type unless the runner supports `config`'s architecture."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source} has model_type {config.model_type!r}, which specserve does not support "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(config, "use_bidirectional_attention", False):  # an embedding model (EmbeddingGemma), not a causal LM
        raise ValueError(f"{source} ({config.model_type!r}) uses bidirectional attention; specserve runs causal LMs")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a local checkpoint directory with transformers' own class and our attention.

    One file or shards (`model.safetensors.index.json`), tied or untied embeddings: transformers
    reads them as it would for itself; its generation_config.json comes with the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_supported(AutoConfig.from_pretrained(path), f"the checkpoint at {path}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    return model.to(device).eval()


def soft_caps_attention(config) -> bool:
    """Whether the model soft-caps attention scores (Gemma 2), which the paged kernel does not."""
    return getattr(config, "attn_logit_softcapping", None) is not None


def cache_shape(model, dtype: torch.dtype) -> CacheShape:
    """KV geometry of any supported architecture, from its config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return CacheShape(cfg.num_hidden_layers, kv_heads, head_dim, dtype)


class ModelRunner:
    """Owns a model and its KV cache; runs batched multi-position forwards."""

    def __init__(self, model, cfg: RunnerConfig = RunnerConfig()):
        check_supported(model.config)
        model.config._attn_implementation = ATTN_IMPLEMENTATION
        self.model = model
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.vocab_size = model.config.vocab_size
        self.cache = KVCache(cache_shape(model, cfg.dtype), cfg.max_num_seqs, cfg.max_seq_len,
                             self.device, cfg.kv_budget_bytes)
        # the paged attention kernel reads cache rows in place (Triton on CUDA, see kernels/dispatch.py)
        self.paged = dispatch.use_triton(self.device, cfg.kernels) and not soft_caps_attention(model.config)
        self.lean = lean.LeanForward(model, self.cache) if cfg.lean and lean.supports(model) and not self.paged else None

    @classmethod
    def from_pretrained(cls, path: str | Path, cfg: RunnerConfig = RunnerConfig()) -> "ModelRunner":
        """A runner for the checkpoint directory at `path`."""
        return cls(load_model(path, cfg.dtype, cfg.device), cfg)

    def weights_changed(self) -> None:
        """The model's weights were replaced in place (hot swap): re-read them where copied."""
        if self.lean is not None:
            self.lean.refresh()

    @staticmethod
    def vocab_size_of(path: str | Path) -> int:
        """Vocabulary size of the checkpoint at `path`, without loading its weights."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path).vocab_size

    # -- sequence bookkeeping -----------------------------------------------------------------

    def add_sequence(self) -> int:
        """Reserve a cache slot; returns its id."""
        return self.cache.allocate()

    def free(self, slot: int) -> None:
        """Release a finished sequence's slot for reuse."""
        self.cache.release(slot)

    @torch.inference_mode()
    def warm_up(self, max_block: int) -> None:
        """One forward of every block size 1..max_block for one sequence (when a slot is free).

        A block size's first forward pays one-off setup (on CPUs, oneDNN builds the matrix
        products for each row count; 2-3 ms on the demo target), which a cost model measuring
        it would take for that size's cost.
        """
        if self.cache.num_free == 0:
            return
        slot = self.add_sequence()
        try:
            self.forward([slot], torch.zeros(1, 1, dtype=torch.long))
            for n in range(1, min(max_block, self.cache.capacity - 1) + 1):
                self.forward([slot], torch.zeros(1, n, dtype=torch.long))
                self.truncate(slot, 1)
        finally:
            self.free(slot)

    def length(self, slot: int) -> int:
        """Tokens currently cached for the sequence."""
        return self.cache.lengths[slot]

    def truncate(self, slot: int, length: int) -> None:
        """Roll the sequence back to `length` cached tokens (O(1))."""
        self.cache.truncate(slot, length)

    def compact(self, slots: list[int], prefix_len: list[int], path: torch.Tensor) -> None:
        """Move accepted tree paths into place in every layer's cache (kernels/compaction.py).

        path: [batch, n] block positions of each row's accepted nodes (path[:, 0] = 0, -1 padded);
        afterwards row b holds them at prefix_len[b] + 0, 1, 2, ... Lengths are the caller's.
        """
        dev = self.device
        slot_t, prefix_t = torch.tensor(slots, device=dev), torch.tensor(prefix_len, device=dev)
        path = path.to(dev)
        for keys, values in zip(self.cache.keys, self.cache.values):
            dispatch.compact_kv(keys, values, slot_t, prefix_t, path, backend=self.cfg.kernels)

    # -- forward --------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        slots: list[int],
        tokens: torch.Tensor,  # [batch, n] int64; rows shorter than n are right-padded
        n_valid: list[int] | None = None,  # real new tokens per row (default: all n)
        block: torch.Tensor | None = None,  # [batch, n, n] bool mask among new tokens (default: chain)
        depth: torch.Tensor | None = None,  # [batch, n] position offset of each new token (default: j)
        logits_to_keep: int = 0,  # 0 = logits at every position, else the last ones only
    ) -> torch.Tensor:
        """Append each row's valid tokens to its sequence and return logits.  # [batch, n', vocab]"""
        batch, n = tokens.shape
        n_valid = n_valid or [n] * batch
        for slot, nv in zip(slots, n_valid):
            self.cache.check_room(slot, nv)
        if batch > 1 and max(self.cache.lengths[s] for s in slots) + n > self.cache.capacity:
            # right-padding a long row would run a nearly full sequence past its cache row
            return self._forward_rows(slots, tokens, n_valid, block, depth, logits_to_keep)
        prefix = torch.tensor([self.cache.lengths[s] for s in slots], dtype=torch.long)
        offsets = torch.arange(n).expand(batch, n)
        positions = prefix.unsqueeze(1) + (offsets if depth is None else depth)
        kv_len = int(prefix.max()) + n
        slot_t = torch.tensor(slots, dtype=torch.long)
        paged = self.paged and n <= PAGED_MAX_BLOCK  # long forwards (prefills) take the SDPA path
        if paged:
            block = chain_block(n_valid, n) if block is None else block
            dev = self.device
            pg = PagedBlock(slot_t.to(dev), prefix.to(dev), block.to(dev), positions.to(dev), self.cfg.kernels)
            mask = BlockMask(None, positions, None, paged=pg)
        elif block is None and depth is None:
            mask = BlockMask.chain(prefix, n, kv_len)
        else:
            block = chain_block(n_valid, n) if block is None else block
            mask = BlockMask.build(prefix, block, positions, kv_len)
        mask = mask.to(self.device)
        single = (slots[0], self.cache.lengths[slots[0]]) if batch == 1 else None
        self.cache.layout = StepLayout(slot_t.to(self.device), (prefix.unsqueeze(1) + offsets).to(self.device),
                                       kv_len, single, paged)
        if self.lean is not None:
            logits = self.lean.forward(tokens, positions, mask, logits_to_keep)
        else:
            logits = self.model(
                input_ids=tokens.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
                block_mask=mask,
            ).logits
        for slot, nv in zip(slots, n_valid):
            self.cache.lengths[slot] += nv
        return logits

    def _forward_rows(self, slots, tokens, n_valid, block, depth, logits_to_keep) -> torch.Tensor:
        """The batch as one forward per row (each unpadded), logits stacked back as [batch, n', vocab]."""
        n = tokens.shape[1]
        rows = []
        for i, (slot, nv) in enumerate(zip(slots, n_valid)):
            row = self.forward([slot], tokens[i : i + 1, :nv], [nv],
                               None if block is None else block[i : i + 1, :nv, :nv],
                               None if depth is None else depth[i : i + 1, :nv])
            rows.append(torch.nn.functional.pad(row, (0, 0, 0, n - nv)))
        out = torch.cat(rows)
        return out[:, -logits_to_keep:] if logits_to_keep else out


def chain_block(n_valid: list[int], n: int) -> torch.Tensor:
    """Causal mask among new tokens; padding positions see only themselves.  # [batch, n, n]"""
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if all(nv == n for nv in n_valid):
        return causal.expand(len(n_valid), n, n)
    valid = torch.arange(n).unsqueeze(0) < torch.tensor(n_valid).unsqueeze(1)  # [batch, n]
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)
    return (causal & pair) | torch.eye(n, dtype=torch.bool)
