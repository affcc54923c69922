"""The b1.58 recipe written out again, so that the probes trust nothing in bitlinear.py, plus
the error measures and the grid test the layer probes share.

  weights      s = 1/mean|W|, W_q = round(W*s).clamp(-1, 1) / s, one scale per matrix
  activations  per token s = 127/max|x| over the last dim, x_q = round(x*s).clamp(-128, 127) / s
"""
import torch
import torch.nn.functional as F

from .problems import SEVERITY_ORDER, is_deviation, severity_of


def result(name: str, passed: bool, evidence: dict, suspected_bug: str | None = None) -> dict:
    """The one shape every probe and detector returns (`suspected_bug`: a problem name)."""
    return {"name": name, "passed": bool(passed), "evidence": evidence,
            "suspected_bug": None if passed else suspected_bug}


def named(name: str, evidence: dict, problems=(), deviations=()) -> dict:
    """A result that names several problems at once: it fails when one of them is fatal or
    harmful; `suspected_bug` is the worst, `problems` all of them (worst first), `severity` the
    worst one's; deviations (harmless conventions, {"problem", "measured"}) go into
    evidence["deviations"] and never fail it."""
    problems = sorted(dict.fromkeys(p for p in problems if not is_deviation(p)),
                      key=lambda p: SEVERITY_ORDER[severity_of(p)])
    out = result(name, not problems, evidence, problems[0] if problems else None)
    if problems:
        out.update(problems=problems, severity=severity_of(problems[0]))
    if deviations:
        evidence["deviations"] = list(deviations)
    return out


def reference_weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Ternary absmean quantization, dequantized: {-1, 0, +1} * mean|W|."""
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1) / scale


def reference_weight_quant_per_row(w: torch.Tensor) -> torch.Tensor:
    """The per-output-channel variant: one absmean scale per row of W."""
    scale = 1.0 / w.abs().mean(dim=1, keepdim=True).clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1) / scale


def reference_activation_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) 8-bit absmax quantization, dequantized."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def activation_quant_128(x: torch.Tensor) -> torch.Tensor:
    """The 128-grid convention: s = 128/max|x|, clamp to [-128, 127] (the largest positive value
    clips by one level). A deviation, not a bug."""
    scale = 128.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def per_tensor_activation_quant(x: torch.Tensor) -> torch.Tensor:
    """The per-tensor mistake: one absmax scale for the whole tensor (a candidate explanation)."""
    scale = 127.0 / x.abs().amax().clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def rms_normalized(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm with a unit gain (as a freshly built one has)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def layer_normalized(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm with unit gain and zero shift (BitNet b1's SubLN in front of the quantizer)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def token_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per-token ||got - want|| / ||want||."""
    got, want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    return (got - want).norm(dim=-1) / want.norm(dim=-1).clamp(min=1e-30)


def typical_error(got, want) -> float:
    """The 90th percentile of per-token errors: one rounding tie that the layer breaks the other
    way (it may quantize in fp32) moves one token, not the verdict."""
    return float(token_errors(got, want).quantile(0.9))


# ---------------------------------------------------------------------------------------------
# Reading the operands


def on_int8_grid(a: torch.Tensor) -> str | None:
    """Which quantization grid `a` (..., in) lies on, or None: per-token absmax (max at level
    127 or 128), one absmax for the tensor, or integer levels (a rescale must follow)."""
    rows = a.reshape(-1, a.shape[-1]).double()
    rows = rows[rows.abs().amax(-1) > 0]
    if rows.numel() == 0:
        return None

    def integral(k):  # per row
        return ((k - k.round()).abs() <= 1e-3).all(-1) & (k.abs().amax(-1) <= 128.5)

    def on_levels(scale):  # each row's largest value at level 127 or at 128 (a 128 grid clips +128 to 127)
        return bool((integral(rows * 127.0 / scale) | integral(rows * 128.0 / scale)).all())

    if on_levels(rows.abs().amax(-1, keepdim=True)):
        return "per_token"
    if on_levels(rows.abs().max()):
        return "per_tensor"
    return "integer" if bool(integral(rows).all()) else None
