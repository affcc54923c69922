"""A BitNet b1.58 decoder, named and shaped like transformers' `BitNetForCausalLM`.

Llama-style pre-norm blocks with RoPE and no biases; BitNet adds `attn_sub_norm`
before `o_proj` and `ffn_sub_norm` before `down_proj`, so every BitLinear input
comes out of an RMSNorm. The MLP is gated with squared ReLU. Embeddings and
`lm_head` stay full precision. Parameter names match transformers' exactly
(`model.layers.0.self_attn.q_proj.weight`, ...), so `state_dict()` loads into
`transformers.BitNetForCausalLM` without renaming.

Every projection is built by `linear_cls(in_features, out_features)`: BitLinear for
quant="ternary", a bias-free nn.Linear for the full-precision twin, or any class passed in.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bitlinear import default_linear_cls
from .config_tiny import BitNetConfig


class BitNetRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class BitNetRotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE (transformers' default rope, rotate-half convention)."""

    def __init__(self, config: BitNetConfig):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class BitNetAttention(nn.Module):
    def __init__(self, config: BitNetConfig, linear_cls):
        super().__init__()
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        if d % h or h % kv:
            raise ValueError(f"hidden_size {d} must divide by num_attention_heads {h}, and that by num_key_value_heads {kv}")
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.q_proj = linear_cls(d, h * hd)
        self.k_proj = linear_cls(d, kv * hd)
        self.v_proj = linear_cls(d, kv * hd)
        self.o_proj = linear_cls(h * hd, d)
        self.attn_sub_norm = BitNetRMSNorm(h * hd, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(self.attn_sub_norm(y))


class BitNetMLP(nn.Module):
    def __init__(self, config: BitNetConfig, linear_cls):
        super().__init__()
        d, ff = config.hidden_size, config.intermediate_size
        self.gate_proj = linear_cls(d, ff)
        self.up_proj = linear_cls(d, ff)
        self.down_proj = linear_cls(ff, d)
        self.ffn_sub_norm = BitNetRMSNorm(ff, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gate_proj(x)).square() * self.up_proj(x)  # squared-ReLU gate ("relu2")
        return self.down_proj(self.ffn_sub_norm(h))


class BitNetDecoderLayer(nn.Module):
    def __init__(self, config: BitNetConfig, linear_cls):
        super().__init__()
        self.input_layernorm = BitNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = BitNetAttention(config, linear_cls)
        self.post_attention_layernorm = BitNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = BitNetMLP(config, linear_cls)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class BitNetModel(nn.Module):
    def __init__(self, config: BitNetConfig, linear_cls):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BitNetDecoderLayer(config, linear_cls) for _ in range(config.num_hidden_layers))
        self.norm = BitNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = BitNetRotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(input_ids.shape[1], input_ids.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class BitNetForCausalLM(nn.Module):
    def __init__(self, config: BitNetConfig, linear_cls=None):
        """`linear_cls(in_features, out_features)` builds every projection (default: by config.quant)."""
        super().__init__()
        self.linear_cls = default_linear_cls(config.quant) if linear_cls is None else linear_cls
        self.config = config
        self.model = BitNetModel(config, self.linear_cls)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):  # BitLinear is an nn.Linear
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}  # tied weights count once
        if exclude_embeddings:
            params.pop(id(self.model.embed_tokens.weight), None)
        return sum(p.numel() for p in params.values())

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """Returns (logits, loss). `labels` are the next tokens, -100 where no loss is taken."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {input_ids.shape[1]} tokens exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}; raise it with --set max_position_embeddings=N"
            )
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, stop_token: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or temperature/top-k sampling; returns prompt + completion.

        Rows that produced `stop_token` keep emitting it, so a batch stops together.
        No KV cache: the models here are small and the contexts short.
        """
        idx = input_ids
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.max_position_embeddings:])
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
            if stop_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
                done |= nxt == stop_token
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if stop_token is not None and bool(done.all()):
                break
        return idx
