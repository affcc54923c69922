"""BitNet b1.58 quantizers and BitLinear.

The recipe (Ma et al. 2024, "The Era of 1-bit LLMs", and its training-tips note):
  weights:     s = 1/mean|W| (one scale per matrix), W_q = round(W*s).clamp(-1, 1) / s
  activations: s = 127/max|x| per token (last dim), x_q = round(x*s).clamp(-128, 127) / s
  gradients:   straight-through estimator, q_ste(x) = x + (q(x) - x).detach()
The *input* of the matmul is quantized, never its output, and there is no bias.

`bug` arguments exist only for the self-test (`--inject-bug`): each reproduces one
known mistake of popular implementations so that the diagnosis can be shown to
catch it. They are off (None) unless asked for.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# Layer-level bugs that `--inject-bug` can switch on (see diagnose.py for the model-level ones).
LAYER_BUGS = ("no_ste", "no_rescale", "per_tensor_act", "quantize_output", "binary_weights", "wrong_scale")


def absmean_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): q = round(W*s).clamp(-1, 1) in {-1, 0, +1} and s = 1/mean|W|; W_q = q / s.
    The split of weight_quant that packing.py stores (q in 2 bits, 1/s as the scale)."""
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1), scale


def weight_quant(w: torch.Tensor, bug: str | None = None) -> torch.Tensor:
    """Ternary absmean quantization, returned dequantized: values in {-1, 0, +1} / s."""
    if bug is None:
        q, scale = absmean_ternary(w)
        return q / scale
    mean_abs = w.abs().mean().clamp(min=1e-5)
    scale = mean_abs if bug == "wrong_scale" else 1.0 / mean_abs  # BUG wrong_scale: mean|W| used as s
    if bug == "binary_weights":  # BUG: sign() is binary, not ternary
        q = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    else:
        q = (w * scale).round().clamp(-1, 1)
    if bug == "no_rescale":  # BUG: ternary values never multiplied back by 1/s
        return q
    return q / scale


def activation_quant(x: torch.Tensor, bug: str | None = None) -> torch.Tensor:
    """Per-token 8-bit absmax quantization, returned dequantized: values in [-128, 127] / s."""
    if bug == "per_tensor_act":  # BUG: one scale for the whole tensor leaks across tokens
        max_abs = x.abs().amax().clamp(min=1e-5)
    else:
        max_abs = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    scale = 127.0 / max_abs
    return (x * scale).round().clamp(-128, 127) / scale


def ste(x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """Forward: x_q. Backward: identity to x (straight-through estimator)."""
    return x + (x_q - x).detach()


class BitLinear(nn.Linear):
    """nn.Linear (no bias) whose forward uses ternary weights and int8 per-token inputs.

    The latent full-precision weight is what the optimizer updates; the quantized
    copies exist only inside forward().
    """

    def __init__(self, in_features: int, out_features: int, bug: str | None = None):
        super().__init__(in_features, out_features, bias=False)
        if bug is not None and bug not in LAYER_BUGS:
            raise ValueError(f"unknown layer bug {bug!r}; choose one of {LAYER_BUGS}")
        self.bug = bug

    def quantized_weight(self) -> torch.Tensor:
        return weight_quant(self.weight, self.bug)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bug = self.bug
        w_q = weight_quant(self.weight, bug)
        if bug == "no_ste":  # BUG: raw round() in the graph; its gradient is zero almost everywhere
            return F.linear(activation_quant(x), w_q)
        w = ste(self.weight, w_q)
        if bug == "quantize_output":  # BUG: matmul on the raw input, then quantize the result
            y = F.linear(x, w)
            return ste(y, activation_quant(y))
        x = ste(x, activation_quant(x, bug))
        return F.linear(x, w)


def make_linear(in_features: int, out_features: int, quant: str, bug: str | None = None) -> nn.Linear:
    """BitLinear for quant='ternary', plain bias-free nn.Linear for the full-precision twin."""
    if quant == "ternary":
        return BitLinear(in_features, out_features, bug=bug)
    if quant == "none":
        return nn.Linear(in_features, out_features, bias=False)
    raise ValueError(f"quant must be 'ternary' or 'none', got {quant!r}")
