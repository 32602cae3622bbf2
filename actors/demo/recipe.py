"""The recipe that produces the demo model pair: tokenizer, target LM, drafter.

1. A byte-level BPE tokenizer trained on the standard library's training files.
2. The target, a small Llama, trained with next-token cross-entropy.
3. The drafter, a much smaller Llama, distilled from the target: forward KL to the target's
   distribution (what decides speculative acceptance) plus a little cross-entropy.

Each stage runs for a wall-clock budget, with the learning rate following the fraction of the
budget spent, so the recipe fits whatever time the machine allows. Progress is logged.

Training is resumable: each stage checkpoints its model, optimizer, data stream and time spent
to `checkpoint_dir` every few minutes and when its budget is spent, and a run given the same
`checkpoint_dir` picks up where the last one stopped (a finished stage is not trained again
unless its budget was raised). So a long recipe can run in pieces, in the background, and on a
GPU where there is one (`device`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import random

from specserve.actors.demo.corpus import SITE_PREFIX, SourceFile, code_split, def_prompts, stdlib_root, stdlib_split

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
QUALITY_PROMPTS, QUALITY_TOKENS = 32, 64  # held-out prompts and greedy tokens of the quality figures
DEMO_PROMPT = "def fibonacci(n):"


@dataclass(frozen=True)
class ModelShape:
    """Llama hyper-parameters for one member of the pair."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


# On a CPU at batch 1 a decoding step costs mostly per-layer overhead, so the target is deep and
# narrow (12 layers: one step costs several drafter steps, and it trains fast enough on two
# cores) and the drafter keeps two layers, the fewest that can copy from context (induction).
TARGET_SHAPE = ModelShape(256, 12, 4, 2, 704)
DRAFTER_SHAPE = ModelShape(192, 2, 3, 3, 512)


@dataclass
class RecipeConfig:
    """Knobs of the demo recipe; defaults produce the committed pair."""

    out_dir: Path
    vocab_size: int = 8192
    seq_len: int = 256
    batch_size: int = 16
    target_minutes: float = 60.0
    drafter_minutes: float = 15.0
    target_lr: float = 1.5e-3
    drafter_lr: float = 3e-3
    kd_weight: float = 0.8  # share of forward-KL in the drafter loss; the rest is cross-entropy
    seed: int = 0
    threads: int = 2
    checkpoint_dir: Path | None = None  # resumable stages (None: no checkpoints)
    checkpoint_every_s: float = 300.0
    device: str = "cpu"
    corpus: str = "stdlib"  # stdlib | code (the stdlib and the installed packages' sources)
    stats: dict = field(default_factory=dict)


def train_tokenizer(files: list[SourceFile], vocab_size: int):
    """Byte-level BPE over the training files, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((f.text for f in files), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None
    )


def encode_corpus(tokenizer, files: list[SourceFile]) -> torch.Tensor:
    """All files as one token stream, EOS between files.  # [n_tokens] int64"""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    texts = [f.text for f in files]
    for start in range(0, len(texts), 256):
        for row in tokenizer(texts[start : start + 256])["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def llama_config(shape: ModelShape, tokenizer, seq_len: int):
    """A LlamaConfig for `shape` sized to the tokenizer, with tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **asdict(shape),
    )


def lr_at(progress: float, peak: float, warmup: float = 0.03) -> float:
    """Linear warm-up then cosine decay to a tenth of `peak`, as a function of budget spent."""
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Batches:
    """Endless random windows of `seq_len + 1` tokens (on `device`), drawn with `gen`, whose
    state is the stream's position (checkpoints save it).  # [batch, seq_len + 1]"""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, gen: torch.Generator,
                 device: str = "cpu"):
        self.tokens, self.span, self.batch_size, self.gen, self.device = tokens, seq_len + 1, batch_size, gen, device

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - self.span, (self.batch_size,), generator=self.gen)
        return torch.stack([self.tokens[s : s + self.span] for s in starts.tolist()]).to(self.device)


def train_for(model, loss_fn, data, minutes: float, peak_lr: float, name: str, checkpoint: Path | None = None,
              every_s: float = 300.0, max_steps: int | None = None) -> tuple[float, int]:
    """Train `model` with AdamW until the time budget is spent (or `max_steps`, whose fraction
    then sets the learning rate, as the budget's does otherwise); return the final mean loss
    and the steps taken in all. `data` is a Batches stream. With `checkpoint`, a run resumes
    from that file (model, optimizer, data stream, steps, time spent) and saves it every
    `every_s` seconds and at the end."""
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget, step, recent, spent = minutes * 60.0, 0, [], 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        data.gen.set_state(state["data"])
        step, recent, spent = state["step"], state["recent"], state["spent_s"]
        log.info("%s: resumed at step %d, %.0f of %.0f s spent", name, step, spent, budget)
    start, saved = time.monotonic() - spent, time.monotonic()

    def save() -> None:
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "data": data.gen.get_state(),
                        "step": step, "recent": recent, "spent_s": time.monotonic() - start}, tmp)
            tmp.replace(checkpoint)  # a run killed mid-save keeps the previous checkpoint

    model.train()
    while (elapsed := time.monotonic() - start) < budget and (max_steps is None or step < max_steps):
        progress = step / max_steps if max_steps is not None else elapsed / budget
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, peak_lr)
        loss = loss_fn(model, next(data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        recent = (recent + [loss.item()])[-50:]
        if step % 25 == 0:
            log.info("%s step %d  %.0f/%.0fs  loss %.4f", name, step, elapsed, budget, sum(recent) / len(recent))
        if time.monotonic() - saved >= every_s:
            save()
            saved = time.monotonic()
    save()
    model.eval()
    return sum(recent) / max(1, len(recent)), step


def ce_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy.  batch: [B, T+1]"""
    logits = model(input_ids=batch[:, :-1]).logits  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def kd_loss_fn(teacher, kd_weight: float):
    """Forward KL(p_target || q_drafter) mixed with cross-entropy on the data."""

    def loss(model, batch: torch.Tensor) -> torch.Tensor:
        inputs, labels = batch[:, :-1], batch[:, 1:].flatten()
        with torch.no_grad():
            p_log = F.log_softmax(teacher(input_ids=inputs).logits.float(), -1).flatten(0, 1)
        q_log = F.log_softmax(model(input_ids=inputs).logits, -1).flatten(0, 1)
        kl = F.kl_div(q_log, p_log, log_target=True, reduction="batchmean")
        return kd_weight * kl + (1 - kd_weight) * F.nll_loss(q_log, labels)

    return loss


@torch.no_grad()
def eval_loss(model, tokens: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    """Mean next-token cross-entropy over consecutive held-out windows."""
    span, losses = seq_len + 1, []
    for i in range(min(max_windows, (len(tokens) - 1) // span)):
        window = tokens[i * span : (i + 1) * span].unsqueeze(0).to(model.device)
        losses.append(ce_loss(model, window).item())
    return sum(losses) / len(losses)


@torch.no_grad()
def greedy_agreement(target, drafter, tokens: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    """Share of held-out positions where the drafter's argmax equals the target's argmax."""
    span, hits, total = seq_len + 1, 0, 0
    for i in range(min(max_windows, (len(tokens) - 1) // span)):
        ids = tokens[i * span : (i + 1) * span - 1].unsqueeze(0).to(target.device)
        a = target(input_ids=ids).logits.argmax(-1)
        b = drafter(input_ids=ids).logits.argmax(-1)
        hits += int((a == b).sum())
        total += a.numel()
    return hits / total


def distinct_4gram_share(tokens: list[int]) -> float:
    """Distinct 4-grams over all 4-grams of a token sequence: 1 for text that never repeats a
    4-gram, near 0 for a degenerate loop."""
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


@torch.no_grad()
def greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `prompt` (no stop)."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt):].tolist()


def pair_quality(target, drafter, tokenizer, held_files: list[SourceFile], seed: int = 0) -> dict:
    """What a newcomer sees of the pair: on QUALITY_PROMPTS held-out `def` prompts, the mean
    share of distinct 4-grams in each model's QUALITY_TOKENS greedy tokens and how often the
    drafter's greedy token equals the target's along the target's output; and the target's
    greedy reply to DEMO_PROMPT."""
    rng = random.Random(seed)
    files = [f for f in held_files if not f.relpath.startswith(SITE_PREFIX)] or list(held_files)
    rng.shuffle(files)
    prompts = def_prompts(files, tokenizer, QUALITY_PROMPTS, 96, rng)
    t_share, d_share, agree, total = [], [], 0, 0
    for p in prompts:
        t_out, d_out = greedy_tokens(target, p, QUALITY_TOKENS), greedy_tokens(drafter, p, QUALITY_TOKENS)
        t_share.append(distinct_4gram_share(t_out))
        d_share.append(distinct_4gram_share(d_out))
        ids = torch.tensor([p + t_out[:-1]], device=target.device)
        with torch.no_grad():
            b = drafter(input_ids=ids).logits[0, len(p) - 1 :].argmax(-1).tolist()
        agree += sum(x == y for x, y in zip(b, t_out))
        total += len(t_out)
    demo = greedy_tokens(target, tokenizer(DEMO_PROMPT)["input_ids"], QUALITY_TOKENS)
    return {"prompts": len(prompts), "tokens": QUALITY_TOKENS,
            "target_distinct_4grams": round(sum(t_share) / len(t_share), 4),
            "drafter_distinct_4grams": round(sum(d_share) / len(d_share), 4),
            "greedy_agreement_on_target_output": round(agree / total, 4),
            "demo_prompt": DEMO_PROMPT, "demo_output": tokenizer.decode(demo)}


def run_recipe(cfg: RecipeConfig) -> dict:
    """Build the demo pair into `cfg.out_dir/{target,drafter}` and return the recipe stats."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    if cfg.corpus not in ("stdlib", "code"):
        raise ValueError(f"corpus must be stdlib or code, not {cfg.corpus!r}")
    train_files, held_files = stdlib_split() if cfg.corpus == "stdlib" else code_split()
    log.info("corpus %s: %d training files, %d held-out files", cfg.corpus, len(train_files), len(held_files))
    ckpt = cfg.checkpoint_dir
    if ckpt is not None and (ckpt / "tokenizer" / "tokenizer.json").exists():  # resuming: the same ids
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt / "tokenizer")
    else:
        tokenizer = train_tokenizer(train_files, cfg.vocab_size)
        if ckpt is not None:
            tokenizer.save_pretrained(ckpt / "tokenizer")
    train_tokens = encode_corpus(tokenizer, train_files)
    held_tokens = encode_corpus(tokenizer, held_files)
    log.info("tokens: %d train, %d held-out", len(train_tokens), len(held_tokens))
    gen = torch.Generator().manual_seed(cfg.seed)
    data = Batches(train_tokens, cfg.seq_len, cfg.batch_size, gen, cfg.device)
    tokens_per_step = cfg.seq_len * cfg.batch_size

    def stage(name: str) -> dict:
        return {"checkpoint": None if ckpt is None else ckpt / f"{name}.pt", "every_s": cfg.checkpoint_every_s}

    target = LlamaForCausalLM(llama_config(TARGET_SHAPE, tokenizer, cfg.seq_len)).to(cfg.device)
    t_loss, t_steps = train_for(target, ce_loss, data, cfg.target_minutes, cfg.target_lr, "target", **stage("target"))
    drafter = LlamaForCausalLM(llama_config(DRAFTER_SHAPE, tokenizer, cfg.seq_len)).to(cfg.device)
    target.requires_grad_(False)
    d_loss, d_steps = train_for(drafter, kd_loss_fn(target, cfg.kd_weight), data, cfg.drafter_minutes,
                                cfg.drafter_lr, "drafter", **stage("drafter"))
    stdlib_held = [f for f in held_files if not f.relpath.startswith(SITE_PREFIX)]
    stdlib_held_tokens = encode_corpus(tokenizer, stdlib_held) if len(stdlib_held) < len(held_files) else held_tokens
    stats = {
        "corpus": cfg.corpus,
        "stdlib_root": str(stdlib_root()),
        "train_files": len(train_files),
        "held_out_files": len(held_files),
        "train_corpus_tokens": len(train_tokens),
        "target": {
            "parameters": sum(p.numel() for p in target.parameters()),
            "steps": t_steps,
            "tokens_seen": t_steps * tokens_per_step,
            "final_train_loss": round(t_loss, 4),
            "held_out_loss": round(eval_loss(target, stdlib_held_tokens, cfg.seq_len), 4),  # stdlib files
            "held_out_loss_all": round(eval_loss(target, held_tokens, cfg.seq_len), 4),
        },
        "drafter": {
            "parameters": sum(p.numel() for p in drafter.parameters()),
            "steps": d_steps,
            "tokens_seen": d_steps * tokens_per_step,
            "final_train_loss_kd_mix": round(d_loss, 4),
            "held_out_loss": round(eval_loss(drafter, held_tokens, cfg.seq_len), 4),
        },
        "held_out_greedy_top1_agreement": round(greedy_agreement(target, drafter, held_tokens, cfg.seq_len), 4),
        "quality": pair_quality(target, drafter, tokenizer, held_files, cfg.seed),
    }
    save_pair(cfg.out_dir, tokenizer, target, drafter, train_files, stats)
    return stats


def save_pair(out_dir: Path, tokenizer, target, drafter, train_files: list[SourceFile], stats: dict) -> None:
    """Write both checkpoints (safetensors, config, tokenizer), the manifest and the stats."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, model in (("target", target), ("drafter", drafter)):
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        # stored in bfloat16 to keep the shipped pair small; loaders upcast to their compute dtype
        model.to("cpu", torch.bfloat16).save_pretrained(out_dir / name, safe_serialization=True)
        tokenizer.save_pretrained(out_dir / name)
    (out_dir / "train_manifest.txt").write_text("\n".join(f.relpath for f in train_files) + "\n")
    (out_dir / "recipe_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
