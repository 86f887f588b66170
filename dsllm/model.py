"""The GPT model: a decoder-only transformer, every option a field of ModelConfig.

token embedding (+ learned positions) -> N x [pre-norm attention + pre-norm MLP, residuals]
-> final norm -> LM head. Attention runs through `scaled_dot_product_attention` (flash attention on
GPU), with grouped-query heads and rotary or learned positions. `generate` decodes with a KV cache.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsllm.experts import expert_names
from dsllm.model_config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as Llama does, so bf16 stays stable)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The model's norm kind over `dim` features (default: d_model)."""
    dim = config.d_model if dim is None else dim
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies [head_dim / 2] and the factor on cos and sin, as Hugging Face computes them for
    the model's `rope_scaling`: 'none'; 'linear' (positions interpolated: every frequency / factor); 'ntk' (NTK-aware
    scaling: `ModelConfig.rope_base`, the base x factor^(d / (d - 2)), so the lowest frequency is divided by the
    factor and the highest kept; exported as plain RoPE with that base); 'yarn' (YaRN:
    the high frequencies kept, the low ones interpolated, a linear ramp between the dimensions that turn
    beta_fast = 32 and beta_slow = 1 times over the original context, and cos, sin x (0.1 ln factor + 1))."""
    dim, base = config.head_dim, config.rope_base
    powers = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if config.rope_scaling in ("none", "ntk"):
        return 1.0 / powers, 1.0
    factor = config.rope_scaling_factor
    if config.rope_scaling == "linear":
        return 1.0 / (factor * powers), 1.0
    if config.rope_scaling == "llama3":
        return _llama3_frequencies(1.0 / powers, config), 1.0

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
        return dim * math.log(config.rope_original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(correction_dim(32)), 0), min(math.ceil(correction_dim(1)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    inv_freq = (1.0 / (factor * powers)) * ramp + (1.0 / powers) * (1 - ramp)
    return inv_freq, 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def _llama3_frequencies(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Llama 3.1's scaling: a wavelength longer than original / low_freq_factor is stretched by the factor, one
    shorter than original / high_freq_factor kept, and in between the two frequencies are blended by
    (original / wavelength - low) / (high - low)."""
    original, factor = config.rope_original_max_seq_len, config.rope_scaling_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    blend = ((original / wavelength - low) / (high - low)).clamp(0, 1)
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, (1 - blend) * inv_freq / factor + blend * inv_freq, scaled)


def rotary_embedding(positions: torch.Tensor, config: ModelConfig, dtype: torch.dtype):
    """cos and sin for `positions` [B, T], shaped [B, 1, T, head_dim], in the half-split layout
    (dimension i pairs with i + head_dim/2, as in Hugging Face Llama), with the model's RoPE scaling
    (`rope_frequencies`). Computed in fp32 each call, so a model cast to bf16 keeps exact angles."""
    inv_freq, scale = rope_frequencies(config)
    angles = positions.float()[..., None] * inv_freq.to(positions.device)  # [B, T, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of one layer for generation, preallocated to the longest sequence."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def _attend(q, k, v, mask=None, dropout: float = 0.0, layout: str = "bhtd"):
    """Causal (or `mask`ed) attention over [B, H, T, D] (layout "bhtd") or [B, T, H, D] ("bthd": DeepSpeed-Ulysses'
    layout, the whole sequence and a share of the heads), with grouped-query heads."""
    if layout == "bthd":
        return _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, dropout).transpose(1, 2)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout, enable_gqa=k.shape[1] != q.shape[1]
    )


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, sequence=None, index: int = 0):
        """`sequence`: a `dsllm.sequence_parallel.SequenceSplit` when this rank holds a piece of each window
        (DeepSpeed-Ulysses: the heads are exchanged for the sequence around attention). `index`: the block's, which
        decides whether its values take a value embedding."""
        super().__init__()
        # no head counts kept: a tensor-parallel rank holds a share of the heads, read off its projection's width
        # (DeepSpeed's AutoTP divides module attributes named like head counts, and not all of them)
        self.q_per_kv, self.head_dim = config.n_heads // config.kv_heads, config.head_dim
        # one fused projection, output laid out as [q (n_heads) | k (kv_heads) | v (kv_heads)]
        qkv = (config.n_heads + 2 * config.kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.d_model, qkv, bias=config.has_qkv_bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm: each head's queries and keys normalised over head_dim (one scale shared by the heads, as Qwen3)
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        # value embeddings: v + value_scale x the token's row of a table (GPT.value_embeddings)
        uses_value_embedding = config.value_embedding_of(index) is not None
        self.value_scale = nn.Parameter(torch.ones(1)) if uses_value_embedding else None
        self.ulysses = None
        if sequence is not None:
            from deepspeed.sequence.layer import DistributedAttention

            # [B, T/N, H, D] -> all-to-all -> [B, T, H/N, D], attention, and back (scatter heads, gather sequence)
            self.ulysses = DistributedAttention(_attend, sequence.group, scatter_idx=2, gather_idx=1)

    def forward(self, x, rotary=None, mask=None, cache: KVCache | None = None, value_embedding=None):
        B, T, _ = x.shape
        qkv = self.qkv(x)
        kv_heads = qkv.shape[-1] // ((self.q_per_kv + 2) * self.head_dim)  # a TP rank's qkv: its q, k and v shards
        heads = kv_heads * self.q_per_kv
        q, k, v = qkv.split([heads * self.head_dim, kv_heads * self.head_dim, kv_heads * self.head_dim], dim=-1)
        q, k = q.view(B, T, heads, self.head_dim), k.view(B, T, kv_heads, self.head_dim)
        if self.q_norm is not None:  # before RoPE, which then rotates unit-RMS (x scale) vectors
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, hd]
        if value_embedding is not None:
            v = v + self.value_scale * value_embedding
        v = v.view(B, T, kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v)
        dropout = self.dropout if self.training else 0.0
        if self.ulysses is not None:
            y = self.ulysses(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, mask, dropout, "bthd")
        else:
            y = _attend(q, k, v, mask, dropout).transpose(1, 2)
        return self.resid_dropout(self.proj(y.reshape(B, T, -1)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.mlp_hidden_size
        self.swiglu, self.relu2 = config.mlp == "swiglu", config.mlp == "relu2"
        self.gelu = "tanh" if config.mlp == "gelu_tanh" else "none"
        # SwiGLU: one fused input projection laid out as [gate | up]
        self.fc = nn.Linear(config.d_model, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.relu2:
            h = F.relu(self.fc(x)).square()
        else:
            h = F.gelu(self.fc(x), approximate=self.gelu)
        return self.dropout(self.proj(h))


def moe_mlp(config: ModelConfig, expert_parallel: int = 1) -> nn.Module:
    """A sparse block's MLP: DeepSpeed's MoE layer over `config.moe_experts` copies of the model's own MLP (each
    initialised apart, by its name: `expert_names`), a top-k router (the k highest gates, as Mixtral; not
    DeepSpeed's default of sampling the second) with a capacity per expert in training (tokens beyond it dropped,
    as GShard does), split over `expert_parallel` ranks (all-to-all before and after the experts). In evaluation
    and generation no token is dropped (capacity factor experts / top_k: an expert could take every token), so a
    score does not depend on which windows share a batch. Its forward returns (output, load-balancing loss,
    tokens per expert)."""
    from deepspeed.moe.layer import MoE

    return MoE(
        config.d_model,
        MLP(config),
        num_experts=config.moe_experts,
        ep_size=expert_parallel,
        k=config.moe_top_k,
        capacity_factor=config.moe_capacity_factor,
        eval_capacity_factor=config.moe_experts / config.moe_top_k,
        min_capacity=config.moe_min_capacity,
        top2_2nd_expert_sampling=False,
    )


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int = 0, expert_parallel: int = 1, sequence=None):
        super().__init__()
        self.norm1, self.attn = make_norm(config), Attention(config, sequence, index)
        self.norm2 = make_norm(config)
        self.mlp = moe_mlp(config, expert_parallel) if config.is_sparse(index) else MLP(config)

    def forward(self, x, rotary=None, mask=None, cache=None, value_embedding=None):
        x = x + self.attn(self.norm1(x), rotary, mask, cache, value_embedding)
        h = self.mlp(self.norm2(x))
        return x + (h[0] if isinstance(h, tuple) else h)  # (an MoE layer's: output, loss, counts)


def causal_lm_loss(logits: torch.Tensor, labels=None, vocab_size=None, shift_labels=None, **_) -> torch.Tensor:
    """Mean cross-entropy of `logits` [..., V] against `shift_labels` (targets already aligned; -100 ignored)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap x tanh(logits / cap) (computed in fp32): every logit inside (-cap, cap), the small ones nearly unchanged;
    `cap` None or 0: the logits as they are."""
    if not cap:
        return logits
    return (cap * torch.tanh(logits.float() / cap)).to(logits.dtype)


def z_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over the scored positions (target not -100) of logsumexp(logits)^2: PaLM's z-loss, which keeps the
    softmax normaliser near 1 (log Z near 0)."""
    log_z = torch.logsumexp(logits.float(), dim=-1)
    scored = targets != -100
    return (log_z.square() * scored).sum() / scored.sum().clamp(min=1)


def _block_forward(block: Block, rotary, mask, x, value_embedding=None):
    return block(x, rotary, mask, None, value_embedding)


def init_seed() -> int:
    """The seed of a new model's weights, drawn from torch's global generator: `torch.manual_seed(s)` before a
    model is built fixes its weights, as it always has."""
    return int(torch.randint(0, 2**62, (), device="cpu").item())


class Weights(Protocol):
    """Stored values of a GPT's parameters by their names in the whole model (`dsllm.model_dir.StoredWeights`)."""

    def value(self, name: str, shape) -> torch.Tensor: ...


def initial_value(name: str, shape, config: ModelConfig, seed: int | Weights) -> torch.Tensor:
    """The initial fp32 value of the GPT parameter called `name` ("blocks.3.attn.qkv.weight"): norms one, biases
    zero, matrices normal(0, init_std), the outputs that add into the residual stream scaled by 1/sqrt(2 n_layers).
    Each parameter draws from its own generator, seeded by the model's seed and its name, so a part of the model
    built alone (a pipeline stage, a tensor-parallel shard) holds exactly the values of the whole model. In place
    of a seed, a trained model's weights (`Weights`: continued pretraining's --init): the value stored under that
    name, so every layout starts from them as it would from a seed."""
    if not isinstance(seed, int):
        return seed.value(name, shape)
    if name == "skip_weights" or name.endswith(".value_scale"):  # U-net skips and value embeddings start at 1
        return torch.ones(shape)
    module, kind = name.rsplit(".", 1)
    if module.rsplit(".", 1)[-1].startswith("norm") or module.endswith(("q_norm", "k_norm")):
        return torch.ones(shape) if kind == "weight" else torch.zeros(shape)
    if kind == "bias":
        return torch.zeros(shape)
    std = config.init_std
    if module.rsplit(".", 1)[-1] == "proj":  # attn.proj, mlp.proj, an expert's proj
        std /= math.sqrt(2 * config.n_layers)
    generator = torch.Generator().manual_seed((seed + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_weights(
    module: nn.Module, config: ModelConfig, seed: int | Weights, prefix: str = "", first_expert: int = 0
) -> None:
    """Set every parameter of `module` (the GPT, or a part of it whose parameters are named `prefix` + their name
    in the part) to its `initial_value`. Through `Module.apply`: under deepspeed.zero.Init (ZeRO-3), which
    partitions each module's parameters as soon as it is built, apply is the one place that gathers them first.
    A parameter on the meta device is left as it is (nothing to set)."""
    # a tied weight: its first name; an expert's: its index among all the layer's experts (`expert_names`)
    names = {id(p): expert_names(prefix + name, first_expert) for name, p in module.named_parameters()}

    def visit(m: nn.Module) -> None:
        for p in m.parameters(recurse=False):
            name = names.pop(id(p), None)  # a parameter shared by two modules is set once
            if name is not None and not p.is_meta:
                p.copy_(initial_value(name, p.shape, config, seed))

    module.apply(visit)


class GPT(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        seed: int | Weights | None = None,
        expert_parallel: int = 1,
        expert_rank: int = 0,
        sequence=None,
    ):
        """`seed` the weights' (`initial_value`: an int, or a trained model's `Weights`); by default drawn from
        torch's global generator. With sparse blocks split over `expert_parallel` ranks, this rank (`expert_rank`
        among them) holds experts
        expert_rank x experts / expert_parallel on. `sequence` (a `dsllm.sequence_parallel.SequenceSplit`): this
        rank sees a piece of each window, its attention exchanging heads for sequence with the others'; such a
        model's forward needs the piece's `positions`."""
        super().__init__()
        config.validate()
        self.config = config
        seed = init_seed() if seed is None else seed  # drawn first: the modules' own default init draws too
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embeddings = (
            nn.Embedding(config.max_seq_len, config.d_model) if config.positions == "learned" else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i, expert_parallel, sequence) for i in range(config.n_layers))
        values = config.kv_heads * config.head_dim
        self.value_embeddings = (
            nn.ModuleList(nn.Embedding(config.vocab_size, values) for _ in range(config.value_embeddings))
            if config.value_embeddings
            else None
        )
        self.skip_weights = nn.Parameter(torch.ones(config.n_layers // 2)) if config.unet_skips else None
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        # the loss of logits and (already shifted) targets; DeepSpeed's AutoTP swaps in its vocabulary-parallel
        # loss when the LM head is split over the vocabulary (HF's hook: logits, labels=None, shift_labels=...)
        self.loss_function = causal_lm_loss
        self.last_z_loss: torch.Tensor | None = None  # the z-loss term of the last training forward (z_loss > 0)
        init_weights(self, config, seed, first_expert=expert_rank * (config.moe_experts // expert_parallel))

    def moe_layers(self) -> list[nn.Module]:
        """The sparse blocks' MoE layers (DeepSpeed's), in order."""
        return [block.mlp for i, block in enumerate(self.blocks) if self.config.is_sparse(i)]

    def moe_stats(self) -> dict[str, float] | None:
        """The routing of the last forward over all sparse blocks (None for a dense model): the load-balancing loss
        (summed over the blocks), the smallest and largest share of the routed tokens one expert of a block got (an
        even spread is 1/experts each), and the fraction of routed tokens dropped for want of capacity (DeepSpeed's
        capacity: max(ceil(tokens / experts x capacity factor x top_k), min capacity) per expert; an expert keeps
        its first tokens up to it)."""
        layers = self.moe_layers()
        if not layers or getattr(layers[0].deepspeed_moe, "exp_counts", None) is None:
            return None
        config, shares, dropped, routed = self.config, [], 0.0, 0.0
        for layer in layers:
            counts = layer.deepspeed_moe.exp_counts.double()
            tokens = float(counts.sum()) / config.moe_top_k
            cap = max(math.ceil(tokens / config.moe_experts * config.moe_capacity_factor * config.moe_top_k),
                      config.moe_min_capacity)  # fmt: skip
            shares += (counts / counts.sum()).tolist()
            dropped += float((counts - cap).clamp(min=0).sum())
            routed += float(counts.sum())
        return {
            "aux_loss": float(sum(layer.deepspeed_moe.l_aux.detach() for layer in layers)),
            "expert_share_min": min(shares),
            "expert_share_max": max(shares),
            "dropped_fraction": dropped / routed,
        }

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        last_only: bool = False,
    ):
        """idx [B, T] -> (logits [B, T, V] (or [B, 1, V] with last_only), mean cross-entropy or None).
        Targets of -100 are ignored. `positions`/`mask` are for generation (padding, cache); training
        uses positions 0..T-1 and the causal mask."""
        x = self.features(idx, positions, mask, caches)
        if last_only:
            x = x[:, -1:]
        logits = softcap(self.lm_head(x), self.config.logit_softcap)
        loss = None
        if targets is not None:
            loss = self.loss_function(logits, shift_labels=targets)
            if self.training and self.config.moe_experts:  # the routers' load-balancing loss, trained with it
                loss = loss + self.config.moe_aux_loss_coef * sum(m.deepspeed_moe.l_aux for m in self.moe_layers())
            if self.training and self.config.z_loss:  # trained with, never scored (as the load-balancing loss)
                term = z_loss(logits, targets)
                self.last_z_loss = term.detach()  # (unweighted, for the log: `dsllm.pretrain`)
                loss = loss + self.config.z_loss * term
        return logits, loss

    def features(self, idx: torch.Tensor, positions=None, mask=None, caches: list[KVCache] | None = None):
        """The final (normalised) hidden states [B, T, d_model] the LM head reads: what a classification head
        (`dsllm.classify`) reads at a sequence's last token."""
        B, T = idx.shape
        if positions is None:
            self.config.check_seq_len(T)
            positions = torch.arange(T, device=idx.device).expand(B, T)
        x = self.tok_embeddings(idx)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(positions)
        x = self.dropout(x)
        rotary = None
        if self.config.positions == "rope":
            rotary = rotary_embedding(positions, self.config, x.dtype)
        checkpointed = self.training and caches is None and self.config.activation_checkpointing != "none"
        tables = [table(idx) for table in self.value_embeddings] if self.value_embeddings is not None else []
        n, skips = len(self.blocks), []
        for i, block in enumerate(self.blocks):
            if self.skip_weights is not None and i >= n - n // 2:  # U-net: the mirror block's output
                x = x + self.skip_weights[n - 1 - i] * skips.pop()
            table = self.config.value_embedding_of(i)
            value_embedding = None if table is None else tables[table]
            if checkpointed:  # (tensors as arguments: DeepSpeed's reentrant recompute sends gradients to those only)
                args = (x,) if value_embedding is None else (x, value_embedding)
                x = self._checkpoint(functools.partial(_block_forward, block, rotary, mask), *args)
            else:
                x = block(x, rotary, mask, None if caches is None else caches[i], value_embedding)
            if self.skip_weights is not None and i < n // 2:
                skips.append(x)
        return self.norm(x)

    def _checkpoint(self, fn, *args):
        if self.config.activation_checkpointing == "deepspeed":
            import deepspeed

            return deepspeed.checkpointing.checkpoint(fn, *args)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        vocab_size: int | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        """New tokens for each prompt (a batch of different lengths is left-padded). Temperature 0 is
        greedy; a row stops after `eos_id` (which is included). Seeded sampling is reproducible.
        `vocab_size`: the tokenizer's, when the embedding is padded beyond it (padding ids never come out).
        `on_token(row, token)` is called as each token comes out, for streaming."""
        was_training = self.training
        self.eval()
        try:
            return self._generate(
                prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed, use_cache, vocab_size, on_token
            )
        finally:
            self.train(was_training)

    def _generate(
        self, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed, use_cache, vocab_size, on_token
    ):
        device = self.lm_head.weight.device
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        B, prompt_len = len(prompts), max(len(p) for p in prompts)
        total = prompt_len + max_new_tokens
        self.config.check_seq_len(total)
        idx = torch.zeros(B, total, dtype=torch.long, device=device)
        valid = torch.zeros(B, total, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            idx[row, prompt_len - len(p) : prompt_len] = torch.tensor(p, device=device)
            valid[row, prompt_len - len(p) :] = True
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        # query i sees valid keys j <= i; a padding query sees itself, so no softmax row is empty
        causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
        full_mask = (causal & valid[:, None, :]) | torch.eye(total, dtype=torch.bool, device=device)
        full_mask = full_mask[:, None]  # [B, 1, total, total]
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        caches = (
            [
                KVCache(B, self.config.kv_heads, total, self.config.head_dim, self.lm_head.weight.dtype, device)
                for _ in self.blocks
            ]
            if use_cache
            else None
        )
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out: list[list[int]] = [[] for _ in range(B)]
        start = 0
        for end in range(prompt_len, total):
            if use_cache:
                window = slice(start, end)
                logits, _ = self(
                    idx[:, window],
                    positions=positions[:, window],
                    mask=full_mask[:, :, window, :end],
                    caches=caches,
                    last_only=True,
                )
                start = end
            else:
                logits, _ = self(
                    idx[:, :end], positions=positions[:, :end], mask=full_mask[:, :, :end, :end], last_only=True
                )
            next_logits = logits[:, -1].float()
            if vocab_size is not None and vocab_size < next_logits.size(-1):
                next_logits[:, vocab_size:] = float("-inf")
            next_token = sample(next_logits, temperature, top_k, top_p, generator)
            idx[:, end] = next_token
            for row in range(B):
                if not done[row]:
                    out[row].append(int(next_token[row]))
                    if on_token is not None:
                        on_token(row, out[row][-1])
            if eos_id is not None:
                done |= next_token == eos_id
                if done.all():
                    break
        return out


def sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> torch.Tensor:
    """One token per row from logits [B, V]: greedy at temperature 0, else top-k, then top-p, then sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def count_parameters(model: GPT) -> int:
    """Unique parameters (a tied embedding/head counts once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N + 12 * L * H * Q * T.

    6N: forward (2) + backward (4) multiply-adds of every weight used in a matmul — all parameters
    except the embedding lookup tables (token embedding when untied, learned positions); the LM head
    is counted (tied or not). 12*L*H*Q*T: attention scores and weighted values (H*Q = d_model),
    forward and backward, over a full T x T score matrix (causal masking not discounted). A sparse (MoE) block
    counts the weights a token goes through: its router and top_k experts' MLPs, not all of them."""
    c = config
    mlp = c.d_model * c.mlp_hidden_size * (3 if c.mlp == "swiglu" else 2)
    per_layer = c.d_model * (c.n_heads + 2 * c.kv_heads) * c.head_dim + c.d_model * c.d_model + mlp
    sparse = c.sparse_blocks * ((c.moe_top_k - 1) * mlp + c.d_model * c.moe_experts)
    matmul_params = c.n_layers * per_layer + sparse + c.d_model * c.vocab_size
    return 6 * matmul_params + 12 * c.n_layers * c.d_model * seq_len
