"""TinyTernaryLM: a small BitNet b1.58 language model written apart from bitnet-tiny.

It shares no code or names with bitnet-tiny (its own config, layer and blocks), so that running
it through `--model` / `--linear` shows what the toolkit makes of someone else's stack. It is a
correct one: ternary absmean weights, per-token 8-bit absmax activations, straight-through
gradients, a causal mask, tied embeddings with a small init. Expect INFRASTRUCTURE OK.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TinyConfig:
    vocab: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ctx: int = 64
    init_std: float = 0.02


class TernaryLinear(nn.Module):
    """y = x_q @ W_q^T with W_q = round(W / mean|W|) clamped to {-1, 0, 1}, times mean|W|, and x_q
    the input on a per-token 8-bit grid; both pass gradients straight through (x + (q - x).detach())."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * 0.02)

    def forward(self, x):
        gamma = self.weight.abs().mean().clamp(min=1e-5)
        w_q = (self.weight / gamma).round().clamp(-1, 1) * gamma
        w = self.weight + (w_q - self.weight).detach()
        s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        x_q = (x * s).round().clamp(-128, 127) / s
        return F.linear(x + (x_q - x).detach(), w)


class Block(nn.Module):
    def __init__(self, c: TinyConfig, linear):
        super().__init__()
        self.n_heads = c.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
        self.qkv, self.proj = linear(c.dim, 3 * c.dim), linear(c.dim, c.dim)
        self.up, self.down = linear(c.dim, 4 * c.dim), linear(4 * c.dim, c.dim)
        self.ln_mid = nn.LayerNorm(4 * c.dim)  # the down projection's input comes out of a norm too
        self.register_buffer("mask", torch.tril(torch.ones(c.ctx, c.ctx, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // self.n_heads)
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.down(self.ln_mid(F.gelu(self.up(self.ln2(x)))))


class TinyTernaryLM(nn.Module):
    def __init__(self, c: TinyConfig, linear=TernaryLinear):
        super().__init__()
        self.c = c
        self.tok = nn.Embedding(c.vocab, c.dim)
        self.pos = nn.Embedding(c.ctx, c.dim)
        self.blocks = nn.ModuleList(Block(c, linear) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.dim)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=c.init_std)

    def forward(self, idx):  # [B, T] token ids -> [B, T, vocab] logits
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.T  # tied head
