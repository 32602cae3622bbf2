"""LeanForward: the same model's forward in as few tensor operations as possible.

On a CPU, a small model's forward through transformers' modules costs mostly per-operation
framework overhead, not arithmetic: the demo drafter's two layers take ~2.8 ms of which the
matrix products are well under one. A drafter step that is a large fraction of a target step
eats most of what speculation gains, and a target step is overhead-bound the same way.

The runner runs targets and drafters alike through it where the model allows.

It reads the weights of the very model the runner holds (Llama, Qwen2, Qwen3 and Mistral families),
fuses q/k/v and gate/up into one product each, stores every weight pre-transposed (a CPU
matrix-vector product over a contiguous [in, out] matrix is about twice as fast as over
nn.Linear's [out, in]), and keeps the rotary tables for every cache position. Attention and
masks are the runner's own (`specserve_attention`, `BlockMask`), and keys and values go into
the same `KVCache`, so the two paths can take turns on one sequence. It covers chains and
token trees; other architectures take transformers' path. `refresh()` after the
model's weights change (hot swap). Tests hold its logits to transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specserve.actors.engine.attention import BlockMask, specserve_attention
from specserve.actors.engine.kv_cache import KVCache

LEAN_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")  # Qwen3: Qwen2's layers with q/k norms, no biases
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin depend only on the position


def supports(model) -> bool:
    """Whether `model` can run the lean path (every other model takes transformers' modules)."""
    cfg = model.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    act = getattr(cfg, "hidden_act", "silu")
    return cfg.model_type in LEAN_MODEL_TYPES and rope in _STATIC_ROPE and act == "silu" \
        and all(_plain_layer(layer) for layer in model.model.layers)


def _plain_layer(layer) -> bool:
    """Whether a layer has only the biases the lean path adds (q/k/v; Llama's attention_bias and
    mlp_bias also put them on o_proj and the MLP) and q/k norms on both or neither."""
    att, mlp = layer.self_attn, layer.mlp
    biased = [m.bias is not None for m in (att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    return not any(biased) and hasattr(att, "q_norm") == hasattr(att, "k_norm")


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as these families' modules compute it (statistics in float32)."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


class _Linear:
    """x @ w for one weight, by the faster CPU routine for the number of rows.

    One or two rows (plain decoding, a drafter step) take MKL's matrix-vector path, the fastest
    there. Three rows and more (a verification block, a batch) go to oneDNN with the weight
    reordered once into its blocked layout. On the demo target a 5-position verification
    forward then costs about 0.7x what it costs through MKL, whose small-M products cost
    nearly in proportion to the rows (its lm_head 4-5x one row's); a batch of 4 or 16 plain
    steps about 0.85x. A weight reordered for any row count >= 2 serves every count >= 2. The
    reordered copy is one more copy of each weight in memory (float32 and bfloat16 on CPUs;
    other dtypes and devices keep the plain product).
    """

    ROWS_BLOCKED = 3  # fewest rows that take the blocked (oneDNN) product

    def __init__(self, weight: torch.Tensor):  # weight: [out, in], as nn.Linear holds it
        weight = weight.detach()
        self.w = weight.t().contiguous()  # [in, out]
        self.blocked = None
        if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) \
                and torch.backends.mkldnn.is_available():
            try:
                self.blocked = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 4)
            except (RuntimeError, AttributeError):  # a build without oneDNN's linear: MKL for every size
                self.blocked = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocked is None or x.numel() < self.ROWS_BLOCKED * x.shape[-1]:
            return x @ self.w
        return torch.ops.mkldnn._linear_pointwise(x, self.blocked, None, "none", [], "")


class _Layer:
    """One decoder layer's weights, fused and transposed."""

    def __init__(self, layer, window: int | None, heads: int, kv_heads: int):
        att, mlp = layer.self_attn, layer.mlp
        self.qkv = _Linear(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))  # [hidden, q+k+v]
        biases = [att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]
        self.qkv_bias = None if biases[0] is None else torch.cat(biases).detach()
        self.o = _Linear(att.o_proj.weight)
        self.gate_up = _Linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))  # [hidden, 2 * inter]
        self.down = _Linear(mlp.down_proj.weight)
        # Qwen3's per-head RMSNorm of q and k before rotary, as one weight over the q and k heads
        self.qk_norm = None if not hasattr(att, "q_norm") else torch.cat(
            [att.q_norm.weight.expand(heads, -1), att.k_norm.weight.expand(kv_heads, -1)]).detach()  # [nq + nk, hd]
        self.norm_in = layer.input_layernorm.weight.detach()
        self.norm_post = layer.post_attention_layernorm.weight.detach()
        self.scaling = att.scaling
        self.window = window


class LeanForward:
    """Forwards of a Llama-family model (chains and token trees) over a runner's KV cache."""

    def __init__(self, model, cache: KVCache):
        if not supports(model):
            raise ValueError(f"the lean forward does not cover model_type {model.config.model_type!r}")
        self.model, self.cache = model, cache
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.refresh()

    def _window(self, layer) -> int | None:
        cfg = self.model.config
        if cfg.model_type == "mistral":
            return getattr(cfg, "sliding_window", None)
        return getattr(layer.self_attn, "sliding_window", None)

    @torch.inference_mode()
    def refresh(self) -> None:
        """Re-read the model's weights (after they were replaced)."""
        inner = self.model.model
        self.layers = [_Layer(layer, self._window(layer), self.heads, self.kv_heads) for layer in inner.layers]
        self.embed = inner.embed_tokens.weight.detach()
        self.norm = inner.norm.weight.detach()
        self.lm_head = _Linear(self.model.lm_head.weight)
        positions = torch.arange(self.cache.capacity, device=self.embed.device).unsqueeze(0)
        probe = torch.zeros(1, 1, self.head_dim, dtype=self.embed.dtype, device=self.embed.device)
        cos, sin = inner.rotary_emb(probe, positions)
        half = self.head_dim // 2
        self.cos = cos[0]  # [capacity, head_dim]
        # rotate_half(x) * sin == cat(x2, x1) * [-sin1, sin2]: the sign folds into the table
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: BlockMask, logits_to_keep: int = 0):
        """Logits of a block of new tokens ([batch, n], right-padded rows allowed).  # [batch, n', vocab]

        positions: [batch, n] logical positions (prefix + j for a chain, prefix + depth in a
        tree); mask: the runner's BlockMask for the block. Keys and values go through
        `KVCache.update` under the layout the caller (ModelRunner.forward) set, which also
        checked room and advances the lengths."""
        batch, n = tokens.shape
        dev = self.embed.device
        positions = positions.to(dev)
        cos, sin = self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)  # [batch, n, 1, head_dim]
        nq, nk, hd, half = self.heads, self.kv_heads, self.head_dim, self.head_dim // 2
        h = self.embed[tokens.to(dev)]  # [batch, n, hidden]
        for i, lw in enumerate(self.layers):
            x = _rms_norm(h, lw.norm_in, self.eps)
            qkv = lw.qkv(x) if lw.qkv_bias is None else lw.qkv(x) + lw.qkv_bias
            qkv = qkv.view(batch, n, nq + 2 * nk, hd)
            qk, v = qkv[:, :, : nq + nk], qkv[:, :, nq + nk :]
            if lw.qk_norm is not None:
                qk = _rms_norm(qk, lw.qk_norm, self.eps)
            qk = qk * cos + torch.cat([qk[..., half:], qk[..., :half]], dim=-1) * sin  # rotary on q and k
            q, k = qk[:, :, :nq], qk[:, :, nq:]
            k_all, v_all = self.cache.update(k.transpose(1, 2), v.transpose(1, 2), i)  # [batch, nk, kv_len, hd]
            att, _ = specserve_attention(None, q.transpose(1, 2), k_all, v_all, None,
                                         scaling=lw.scaling, sliding_window=lw.window, block_mask=mask)
            h = h + lw.o(att.view(batch, n, nq * hd))
            x = _rms_norm(h, lw.norm_post, self.eps)
            gate, up = lw.gate_up(x).chunk(2, dim=-1)
            h = h + lw.down(F.silu(gate) * up)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(_rms_norm(h, self.norm, self.eps))
