"""A small decoder-only transformer language model over bytes (the GPU-shaped workload).

GPT-2-style: learned token and position embeddings, pre-LayerNorm blocks of causal
self-attention (``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal=True``,
which picks the flash / memory-efficient kernels on a GPU) and a 4x GELU MLP, a final
LayerNorm and an output head tied to the token embedding. The vocabulary is the 256 byte
values, so any UTF-8 text is its own tokenization.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from runtime.models._base import Architecture, ModelIO

VOCAB_SIZE = 256  # bytes


class _CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (B, T, D) -> (B, H, T, D/H)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        out: torch.Tensor = self.proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return out


class _Block(nn.Module):
    """Pre-LayerNorm residual block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharTransformerLM(nn.Module):
    """Byte-level decoder-only transformer: ``forward(idx[B, T]) -> logits[B, T, vocab_size]``.

    ``seq_len`` is the longest context the learned position embedding covers; shorter
    inputs are fine. The output head shares its weight with the token embedding.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 2,
        seq_len: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.vocab_size, self.d_model, self.n_heads = vocab_size, d_model, n_heads
        self.n_layers, self.seq_len = n_layers, seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input/output embeddings
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections so the residual stream's variance does not
        # grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"input has {t} tokens but the model's seq_len is {self.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.ln_f(x))
        return logits

    @torch.inference_mode()
    def generate(self, prompt: bytes, max_new_bytes: int) -> bytes:
        """Greedy continuation of ``prompt`` (the last ``seq_len`` bytes are the context)."""
        device = self.tok_emb.weight.device
        out = bytearray(prompt or b"\n")
        for _ in range(max_new_bytes):
            idx = torch.tensor([list(out[-self.seq_len :])], dtype=torch.long, device=device)
            out.append(int(self(idx)[0, -1].argmax()))
        return bytes(out[len(prompt) :]) if prompt else bytes(out[1:])


class CharLMConfig(Architecture):
    """``model: {architecture: char_lm, d_model: 768, n_heads: 12, n_layers: 12, seq_len: 1024}``."""

    architecture: Literal["char_lm"] = "char_lm"
    inputs: ClassVar[Literal["features", "tokens"]] = "tokens"
    d_model: int = Field(default=128, gt=0, description="Width of the residual stream.")
    n_heads: int = Field(default=4, gt=0, description="Attention heads; must divide d_model.")
    n_layers: int = Field(default=2, gt=0, description="Transformer blocks.")
    seq_len: int = Field(default=128, gt=0, description="Context length in bytes.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide(self) -> CharLMConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}): each head gets "
                f"d_model / n_heads dims; e.g. d_model {self.n_heads * max(1, round(self.d_model / self.n_heads))}"
            )
        return self

    @property
    def io(self) -> ModelIO:
        return ModelIO(VOCAB_SIZE, VOCAB_SIZE)

    def build(self, io: ModelIO) -> nn.Module:
        return CharTransformerLM(io.input_dim, self.d_model, self.n_heads, self.n_layers, self.seq_len, self.dropout)


def num_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Trainable parameters, each shared tensor counted once (so a tied head adds nothing).

    ``exclude_embeddings`` drops the weights of every ``nn.Embedding`` (token and position),
    the "non-embedding" N of the scaling-law papers that :func:`flops_per_token` wants.
    """
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen and id(p) not in embedding:
            seen.add(id(p))
            total += p.numel()
    return total


def flops_per_token(n_params_non_embedding: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N + 12 * n_layers * d_model * seq_len``.

    The approximation of PaLM (Chowdhery et al. 2022, appendix B) and Chinchilla (Hoffmann
    et al. 2022): every non-embedding weight does one multiply-add (2 FLOPs) per token in
    the forward pass and twice that in the backward pass (6N), and attention's
    ``Q @ K^T`` and ``softmax @ V`` add ``2 * 2 * n_layers * seq_len * d_model`` forward,
    times 3 for forward + backward. It ignores the causal mask (a full score matrix is
    counted, as in PaLM), LayerNorm, softmax, the embedding lookup and, with ``N`` excluding
    embeddings, the tied output head (``6 * d_model * vocab_size``, small for 256 bytes).
    Dividing achieved FLOP/s by the hardware peak gives model FLOPs utilization (MFU).
    """
    return 6.0 * n_params_non_embedding + 12.0 * n_layers * d_model * seq_len
