"""bitnet-tiny's cfg -> TinyTernaryLM, for --model / --optimizer (README, "Check your own stack")."""
import torch
from tiny_ternary_lm import TernaryLinear, TinyConfig, TinyTernaryLM


def build(cfg, linear_cls=TernaryLinear):  # taking linear_cls lets the twin be this model with nn.Linear
    return TinyTernaryLM(TinyConfig(vocab=cfg.vocab_size, dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
                                    n_heads=cfg.num_attention_heads, ctx=cfg.max_position_embeddings), linear=linear_cls)


def optimizer(model, cfg):
    return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay)


def adam_l2(model, cfg):  # a known mistake: Adam's weight_decay is an L2 term in the gradient, not AdamW's decay
    return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=0.1)
