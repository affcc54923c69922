"""The b1.58 recipe written out again, so that the probes trust nothing in bitlinear.py, plus
the error measures, the grid test and the candidate products (the recipe's usual mistakes and
harmless conventions, combined) that the layer probes share.

  weights      s = 1/mean|W|, W_q = round(W*s).clamp(-1, 1) / s, one scale per matrix
  activations  per token s = 127/max|x| over the last dim, x_q = round(x*s).clamp(-128, 127) / s
"""
import torch
import torch.nn.functional as F

from .problems import DEVIATION, FATAL, HARMFUL, SEVERITY_ORDER, is_deviation, severity_of


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


def one_magnitude(b: torch.Tensor) -> bool:
    nonzero = b[b != 0].abs()
    return nonzero.numel() > 0 and float(nonzero.max() - nonzero.min()) <= 1e-5 * float(nonzero.max())


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


# ---------------------------------------------------------------------------------------------
# The recipe's usual mistakes and harmless conventions, as candidates fitted jointly to an output


def token_max(t):
    return t.abs().amax(-1, keepdim=True).clamp(min=1e-5)


def sign_scaled(u):  # XNOR-net style: sign(x) times mean|x| per token
    return torch.sign(u) * u.abs().mean(-1, keepdim=True)


# name -> (quantizer, problems, the scale it multiplies by (a rescale may be missing), or None)
ACTIVATIONS = {
    "int8 per token": (reference_activation_quant, (), lambda u: 127.0 / token_max(u)),
    "128 grid": (activation_quant_128, ("act_grid_128",), lambda u: 128.0 / token_max(u)),
    "int8 per tensor": (per_tensor_activation_quant, ("per_tensor_act_scale",), lambda u: 127.0 / u.abs().amax()),
    "not rounded": (lambda u: u, ("act_not_rounded",), None),
    "sign": (torch.sign, ("binary_activations",), None),
    "sign * mean|x|": (sign_scaled, ("binary_activations",), None),
}


def weight_candidates(w):
    mean_abs = w.abs().mean().clamp(min=1e-5)
    return {"ternary": (reference_weight_quant(w), (), 1 / mean_abs),
            "ternary per row": (reference_weight_quant_per_row(w), ("per_row_weight_scale",), None),
            "binary": (torch.where(w >= 0, 1.0, -1.0).to(w) * mean_abs, ("binary_not_ternary",), 1 / mean_abs),
            # BitNet b1's sign(W - mean W), still found in b1.58 code
            "binary centred": (torch.sign(w - w.mean()) * mean_abs, ("binary_not_ternary",), 1 / mean_abs),
            "not quantized": (w, ("weights_not_quantized",), None)}


OUTPUT_QUANT = {"output quantized per token": (reference_activation_quant, ("quantizes_output",), "per token"),
                "output quantized per tensor": (per_tensor_activation_quant,
                                                ("quantizes_output", "per_tensor_act_scale"), "per tensor")}


def output_candidates(w):
    """(description, problems, make) for every way of combining an activation quantizer, a
    weight quantizer and (instead of quantizing the input) a quantized output, as one layer often
    holds several mistakes at once; make(u) -> (the product, {scale name: the scale it
    multiplied in, which a missing rescale leaves in the output})."""
    out = []
    for w_name, (w_q, w_problems, w_scale) in weight_candidates(w).items():
        for a_name, (quant, a_problems, a_scale) in ACTIVATIONS.items():
            def make(u, w_q=w_q, w_scale=w_scale, quant=quant, a_scale=a_scale, a_name=a_name):
                scales = {"weight scale 1/mean|W|": w_scale, f"activation scale ({a_name})": a_scale and a_scale(u)}
                return F.linear(quant(u), w_q), {k: v for k, v in scales.items() if v is not None}
            out.append((f"{a_name} x {w_name}", a_problems + w_problems, make))
        for o_name, (quant, o_problems, per) in OUTPUT_QUANT.items():
            def make(u, w_q=w_q, quant=quant, per=per):
                plain = F.linear(u, w_q)
                o_scale = 127.0 / (token_max(plain) if per == "per token" else plain.abs().amax())
                return quant(plain), {f"output scale ({per})": o_scale}
            out.append((f"{o_name} x {w_name}", o_problems + w_problems, make))
    return out


def badness(problems) -> int:
    weight = {FATAL: 100, HARMFUL: 10, DEVIATION: 1}
    return sum(weight[severity_of(p)] for p in problems)


def fitted_factor(y, want):
    """Per-token least-squares factor c with y ~ c * want, and the error left after it."""
    y, want = y.reshape(-1, y.shape[-1]), want.reshape(-1, want.shape[-1])
    factor = (y * want).sum(-1) / (want * want).sum(-1).clamp(min=1e-30)
    return factor, typical_error(y, factor[:, None] * want)


def per_token(scale, n: int) -> torch.Tensor:
    """A scale (a number, or one per token) as one value per token."""
    scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
    return scale.expand(n) if scale.numel() == 1 else scale


def missing_scales(factor, scales: dict) -> list[str] | None:
    """The smallest set of the candidate's own scales whose product is the factor of every
    token: the scales the layer multiplied in and never divided back out."""
    names = list(scales)
    for subset in [[n] for n in names] + [[a, b] for i, a in enumerate(names) for b in names[i + 1:]]:
        want = torch.ones_like(factor)
        for n in subset:
            want = want * per_token(scales[n], factor.shape[0])
        if bool(((factor - want).abs() <= 1e-2 * want.abs()).all()):
            return subset
    return None


def spread(factor) -> float:
    return float((factor.max() - factor.min()) / factor.abs().max().clamp(min=1e-30))


def deviation_size(problem: str, u, w) -> float:
    """How far the recipe's output moves with this one convention alone (relative, per token)."""
    x_q, w_q = reference_activation_quant(u), reference_weight_quant(w)
    changed = {"act_grid_128": lambda: F.linear(activation_quant_128(u), w_q),
               "per_row_weight_scale": lambda: F.linear(x_q, reference_weight_quant_per_row(w))}[problem]()
    return typical_error(changed, F.linear(x_q, w_q))
