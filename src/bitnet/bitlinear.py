"""BitNet b1.58 quantizers and BitLinear.

The recipe (Ma et al. 2024, "The Era of 1-bit LLMs", and its training-tips note):
  weights:     s = 1/mean|W| (one scale per matrix), W_q = round(W*s).clamp(-1, 1) / s
  activations: s = 127/max|x| per token (last dim), x_q = round(x*s).clamp(-128, 127) / s
  gradients:   straight-through estimator, q_ste(x) = x + (q(x) - x).detach()
The *input* of the matmul is quantized, never its output, and there is no bias.

Only the correct stack lives here; the self-test's broken variants (`--inject-bug`) are
wrapper layers in bitnet/diagnose/bugs.py.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def absmean_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): q = round(W*s).clamp(-1, 1) in {-1, 0, +1} and s = 1/mean|W|; W_q = q / s.
    The split of weight_quant that packing.py stores (q in 2 bits, 1/s as the scale)."""
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1), scale


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Ternary absmean quantization, returned dequantized: values in {-1, 0, +1} / s."""
    q, scale = absmean_ternary(w)
    return q / scale


def activation_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-token 8-bit absmax quantization, returned dequantized: values in [-128, 127] / s."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def ste(x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """Forward: x_q. Backward: identity to x (straight-through estimator)."""
    return x + (x_q - x).detach()


class BitLinear(nn.Linear):
    """nn.Linear (no bias) whose forward uses ternary weights and int8 per-token inputs.

    The latent full-precision weight is what the optimizer updates; the quantized
    copies exist only inside forward().
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = ste(self.weight, weight_quant(self.weight))
        x = ste(x, activation_quant(x))
        return F.linear(x, w)


def full_precision_linear(in_features: int, out_features: int) -> nn.Linear:
    """The full-precision twin's projection: a bias-free nn.Linear."""
    return nn.Linear(in_features, out_features, bias=False)


def default_linear_cls(quant: str):
    """BitLinear for quant='ternary', the bias-free nn.Linear for the full-precision twin."""
    if quant == "ternary":
        return BitLinear
    if quant == "none":
        return full_precision_linear
    raise ValueError(f"quant must be 'ternary' or 'none', got {quant!r}")
