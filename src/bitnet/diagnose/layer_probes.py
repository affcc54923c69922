"""Probes of one quantized layer, treated as a black box: the same code judges every BitLinear of
our model in the verdict and any layer `python -m bitnet.check_layer` is given.

The layer is driven through forward and backward with chosen inputs while we watch what the
matmul receives (F.linear, torch.matmul and Tensor.__matmul__ are hooked), which modules run
and which parameters appear during forward(); outputs and gradients are compared with the
b1.58 recipe, written out again here so that nothing trusts bitlinear.py:
  weights      s = 1/mean|W|, W_q = round(W*s).clamp(-1, 1) / s, one scale per matrix
  activations  per token s = 127/max|x| over the last dim, x_q = round(x*s).clamp(-128, 127) / s
  gradients    straight-through: dL/dW = g^T x_q and dL/dx = g W_q
  the input of the matmul is quantized, never its output.
A norm inside the layer (x / rms(x), as an RMSNorm registered in __init__ gives) is allowed: it
is found by its effect (the output ignores the input's scale) and put into the reference.

Each check returns `result(name, passed, evidence, problem)`; the problem names are defined in
the README ("Check your own layer").
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .reference import (layer_normalized, on_int8_grid, per_tensor_activation_quant,  # noqa: F401 - result is re-exported
                        reference_activation_quant, reference_weight_quant, reference_weight_quant_per_row, rel, result, rms_normalized,
                        typical_error)
from .watch import MatmulCall, Observation, observe, quiet_call


def near(a: float, b: float, tol: float = 1e-3) -> bool:
    return abs(a - b) <= tol * abs(b)


def one_magnitude(b: torch.Tensor) -> bool:
    nonzero = b[b != 0].abs()
    return nonzero.numel() > 0 and float(nonzero.max() - nonzero.min()) <= 1e-5 * float(nonzero.max())


def check_weight_operand(call: MatmulCall | None, latent: torch.Tensor) -> dict:
    """The weight the matmul receives is ternary times one scale, in the pattern of
    round(W / mean|W|), and that scale is mean|W| (or 1: integer levels, rescaled after).
    One scale per output row (mean|W| of the row) is accepted as a variant of the recipe."""
    name = "weights_ternary"
    if call is None:
        return result(name, True, {"note": "no F.linear/matmul with this layer's weight shape was seen"})
    b, w = call.weight.double(), latent.detach().double()
    mean_abs = w.abs().mean().clamp(min=1e-5)
    zero_share = float((b == 0).double().mean())
    want_zero_share = float(((w / mean_abs).round().clamp(-1, 1) == 0).double().mean())
    ev = {"zero_share": zero_share, "expected_zero_share": want_zero_share, "latent_mean_abs": float(mean_abs),
          "distinct_values": int(b.unique().numel())}
    if zero_share == 1.0 or (zero_share > 0.99 and want_zero_share < 0.99):
        return result(name, False, {**ev, "why": "(almost) every weight is zero"}, "wrong_weight_scale")
    if not one_magnitude(b):
        if not all(one_magnitude(row) for row in b if bool((row != 0).any())):
            return result(name, False, {**ev, "why": "more than one magnitude: not quantized to ternary"},
                          "weights_not_quantized")
        mean_abs = w.abs().mean(dim=1, keepdim=True).clamp(min=1e-5)
        ev["scale_per"] = "output row"
    want = (w / mean_abs).round().clamp(-1, 1)
    magnitude = b.abs().amax(dim=1, keepdim=True) if mean_abs.dim() else b.abs().max()
    ev.update(magnitude_max=float(magnitude.max()), magnitude_min=float(magnitude.min()))
    if zero_share == 0.0 and want_zero_share > 0.05:
        return result(name, False, {**ev, "why": "two values +-c and no zeros"}, "binary_not_ternary")
    mismatched = float((torch.sign(b) != want).double().mean())
    ev["pattern_mismatch_share"] = mismatched
    if mismatched > 1e-3:
        return result(name, False, {**ev, "why": "ternary pattern differs from round(W/mean|W|)"},
                      "wrong_weight_scale")
    used = magnitude > 0  # rows that rounded to all zeros say nothing about the scale

    def near_all(want_scale) -> bool:
        return bool(((magnitude - want_scale).abs() <= 1e-3 * want_scale)[used.expand_as(magnitude)].all())

    if near_all(mean_abs.expand_as(magnitude)):
        return result(name, True, {**ev, "scale": "mean|W| (dequantized)"})
    if near_all(torch.ones_like(magnitude)):
        return result(name, True, {**ev, "scale": "1 (integer levels: the output must be rescaled)"})
    return result(name, False, {**ev, "why": f"magnitude {float(magnitude.max()):.4g}, expected mean|W| = "
                                             f"{float(mean_abs.max()):.4g}"}, "wrong_weight_scale")


def check_activation_operand(call: MatmulCall | None, output: torch.Tensor) -> dict:
    """The input the matmul receives lies on an 8-bit grid (not binary, not merely scaled)."""
    name = "activations_int8"
    if call is None:
        return result(name, True, {"note": "no matmul seen"})
    a = call.activation.reshape(-1, call.activation.shape[-1])
    distinct = int(max(len(row.unique()) for row in a))
    grid = on_int8_grid(a)
    ev = {"grid": grid, "max_distinct_values_per_token": distinct}
    if a.shape[-1] >= 8 and distinct <= 3:
        return result(name, False, {**ev, "why": "at most 3 values per token"}, "binary_activations")
    if grid is not None:
        return result(name, True, ev)
    out_grid = on_int8_grid(output)
    ev["output_grid"] = out_grid
    if out_grid is not None:
        return result(name, False, {**ev, "why": "matmul input not quantized, output is"}, "quantizes_output")
    return result(name, False, {**ev, "why": "matmul input is not on an 8-bit grid"}, "act_not_rounded")


# ---------------------------------------------------------------------------------------------
# The layer's own parameters


def latent_weight(layer: nn.Module, in_features: int, out_features: int) -> tuple[str, torch.Tensor, bool] | None:
    """(name, tensor, transposed) of the full-precision weight: the first 2-D tensor of shape
    (out, in) or (in, out) among parameters, then buffers and plain tensor attributes."""
    tensors = list(layer.named_parameters()) + list(layer.named_buffers())
    tensors += [(k, v) for k, v in vars(layer).items() if torch.is_tensor(v)]
    for name, t in tensors:
        if t.dim() == 2 and tuple(t.shape) == (out_features, in_features):
            return name, t, False
        if t.dim() == 2 and tuple(t.shape) == (in_features, out_features):
            return name, t, True
    return None


def bias_parameter(layer: nn.Module, out_features: int) -> torch.Tensor | None:
    for name, p in layer.named_parameters():
        if name.split(".")[-1] == "bias" and tuple(p.shape) == (out_features,):
            return p
    return None


def token_inputs(shape, seed: int, low: float = 0.1, high: float = 10.0) -> torch.Tensor:
    """Random (B, T, in) inputs whose tokens have magnitudes from `low` to `high`, so that a
    per-tensor scale and a per-token one disagree."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x * torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), shape[1],
                              dtype=torch.float64)[None, :, None]


def check_bias(layer, bias, x) -> tuple[dict, torch.Tensor | None]:
    """A bias that is kept must change the output. Returns (result, the bias the output carries)."""
    name = "bias_used"
    if bias is None:
        return result(name, True, {"note": "no bias parameter"}), None
    with torch.no_grad():
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(9), dtype=bias.dtype))
        with_bias = quiet_call(layer, x)
        probe_bias = bias.detach().clone()
        bias.zero_()
        without = quiet_call(layer, x)
        bias.copy_(probe_bias)  # the rest of the probes run with a visible, non-zero bias
    shift = (with_bias - without).reshape(-1, with_bias.shape[-1])
    used = float(shift.abs().max()) > 1e-6 * float(probe_bias.abs().max())
    ev = {"output_change_when_bias_set": float(shift.abs().max())}
    return result(name, used, ev, "bias_unused"), (probe_bias if used else None)


def check_per_token(layer, x, y) -> dict:
    """Change two tokens (one x1000, one replaced by a spike); every other token's output must
    stay unchanged. One scale shared across tokens leaks the change into all of them."""
    x2 = x.clone()
    x2[1, 5] *= 1000.0
    spike = torch.full_like(x2[0, 2], 1e-3)
    spike[0] = 50.0
    x2[0, 2] = spike
    y2 = quiet_call(layer, x2)
    others = torch.ones(y.shape[:2], dtype=torch.bool)
    others[1, 5] = others[0, 2] = False
    change = float((y2[others] - y[others]).abs().max() / y[others].abs().max().clamp(min=1e-30))
    return result("per_token_scale", change < 1e-5, {"other_tokens_max_relative_change": change},
                  "per_tensor_act_scale")


def input_normalized(layer, x, y, bias) -> dict:
    """Does the layer normalize its input (output unchanged when x is scaled by 3) or is it
    linear in the input's scale (output x3)? The reference is built to match."""
    b = 0 if bias is None else bias.detach()
    y3 = quiet_call(layer, 3 * x) - b
    y0 = y - b
    return {"normalizes": typical_error(y3, y0) < 1e-3, "scales": typical_error(y3, 3 * y0) < 1e-3}


NORMS = {"rms_norm": rms_normalized, "layer_norm": layer_normalized}


def output_candidates(u, w):
    """What the layer's output would be under the recipe and under each usual mistake."""
    mean_abs = w.abs().mean().clamp(min=1e-5)
    w_q, x_q = reference_weight_quant(w), reference_activation_quant(u)
    return {"recipe": (F.linear(x_q, w_q), None),
            "quantized_output": (reference_activation_quant(F.linear(u, w_q)), "quantizes_output"),
            "per_tensor_input": (F.linear(per_tensor_activation_quant(u), w_q), "per_tensor_act_scale"),
            "unrounded_input": (F.linear(u, w_q), "act_not_rounded"),
            "binary_weights": (F.linear(x_q, torch.where(w >= 0, 1.0, -1.0).to(w) * mean_abs), "binary_not_ternary"),
            # BitNet b1's sign(W - mean W), still found in b1.58 code
            "binary_centred_weights": (F.linear(x_q, torch.sign(w - w.mean()) * mean_abs), "binary_not_ternary"),
            "unquantized_weights": (F.linear(x_q, w), "weights_not_quantized"),
            "per_row_scale": (F.linear(x_q, reference_weight_quant_per_row(w)), None)}  # accepted variant


def fitted_factor(y, want):
    """Per-token least-squares factor c with y ~ c * want, and the error left after it."""
    y, want = y.reshape(-1, y.shape[-1]), want.reshape(-1, want.shape[-1])
    factor = (y * want).sum(-1) / (want * want).sum(-1).clamp(min=1e-30)
    return factor, typical_error(y, factor[:, None] * want)


def read_factor(factor, u, mean_abs: float, normalizes: bool) -> tuple[str, str]:
    """(problem, why) for an output that is the right shape but off by `factor` per token."""
    u_max = u.reshape(-1, u.shape[-1]).abs().amax(-1)
    for why, want in (("1/mean|W|: weight scale never applied back", torch.full_like(factor, 1 / mean_abs)),
                      ("127/max|x|: activation scale never applied back", 127 / u_max),
                      ("both scales never applied back", 127 / u_max / mean_abs)):
        if bool(((factor - want).abs() <= 1e-2 * want).all()):
            return "missing_rescale", why
    if normalizes:
        return "wrong_norm_scale", "normalized input has the wrong scale"
    return "wrong_weight_scale", "output off by a factor"


def check_output(y, x, w, bias, norm: dict, weight_check: dict) -> dict:
    """The output equals linear(per-token-quantized input, ternary weight) (+ bias), where the
    input is x, or x normalized (RMSNorm or LayerNorm, unit gain) when the layer ignores the
    input's scale. On a mismatch, the recipe and the usual mistakes are each fitted to the
    output up to a factor per token: an exact fit names its mistake; a fit up to a factor names
    what the factor is (a missing rescale, a wrong norm scale)."""
    name = "output_matches_recipe"
    y = y - (0 if bias is None else bias.detach())
    mean_abs = float(w.abs().mean().clamp(min=1e-5))
    ev = {"input_normalized_in_layer": norm["normalizes"]}
    if float(y.abs().max()) == 0.0:
        return result(name, False, {**ev, "why": "the output is all zeros"}, "wrong_weight_scale")
    inputs = {k: f(x) for k, f in NORMS.items()} if norm["normalizes"] else {"none": x}
    fits = {}  # (input norm, candidate) -> (error, error after a per-token factor, factor, problem)
    for u_name, u in inputs.items():
        for c_name, (want, problem) in output_candidates(u, w).items():
            factor, scaled = fitted_factor(y, want)
            fits[u_name, c_name] = (typical_error(y, want), scaled, factor, problem)
    exact = min(fits, key=lambda k: fits[k][0])
    shape = min(fits, key=lambda k: fits[k][1])
    ev["input_norm"] = exact[0]
    ev["relative_error"] = {c: round(e, 6) for (u, c), (e, *_rest) in fits.items() if u == exact[0]}
    if fits[exact][0] < 1e-3:
        ev["closest"] = exact[1]
        return result(name, fits[exact][3] is None, ev, fits[exact][3])
    if fits[shape][1] < 1e-3 and not bool(((fits[shape][2] - 1).abs() < 1e-2).all()):
        factor = fits[shape][2]
        ev.update(input_norm=shape[0], shape_matches=shape[1], output_over_it_min=float(factor.min()),
                  output_over_it_max=float(factor.max()), dim=x.shape[-1])
        problem, why = read_factor(factor, inputs[shape[0]], mean_abs, norm["normalizes"])
        return result(name, False, {**ev, "why": why}, problem)
    ev["closest"] = exact[1]
    problem = fits[exact][3] if fits[exact][0] < 1e-2 else weight_check.get("suspected_bug")
    return result(name, False, ev, problem)


def check_gradients(layer, weight, transposed, x, g, obs: Observation, norm: dict) -> dict:
    """Backward is the straight-through one: with G the gradient arriving at the matmul's output
    and A, B what it multiplied, dL/dW = G^T A (times s when B holds integer levels) and
    dL/dx = (G B) passed back through the quantizer as identity (and through the layer's norm)."""
    name = "ste_gradients"
    if not weight.requires_grad or not isinstance(weight, nn.Parameter):
        return result(name, False, {"why": "the latent weight is not a trainable parameter"}, "weights_not_trainable")
    d_w = None if weight.grad is None else (weight.grad.T if transposed else weight.grad)
    if d_w is None:
        return result(name, False, {"why": "the latent weight gets no gradient"}, "weights_not_trainable")
    if x.grad is None:
        return result(name, False, {"why": "no gradient reaches the input"}, "no_ste")
    ev = {"weight_grad_norm": float(d_w.norm()), "input_grad_norm": float(x.grad.norm())}
    if not (torch.isfinite(d_w).all() and torch.isfinite(x.grad).all()):
        return result(name, False, {**ev, "why": "non-finite gradient"}, "no_ste")
    w = weight.detach().T if transposed else weight.detach()
    # the input may reach the quantizer directly or through the layer's norm
    u_fns = (lambda t: t, *NORMS.values()) if norm["normalizes"] else (lambda t: t,)
    call = next((c for c in obs.calls if c.grad_output is not None), None)
    if call is not None:
        G, A, B = (t.double().reshape(-1, t.shape[-1]) for t in (call.grad_output, call.activation, call.weight))
        factors = (1.0, 1.0 / float(w.abs().mean().clamp(min=1e-5)))  # dequantized B, or integer levels
        want_d_w = [f * G.T @ A for f in factors]
        d_a = (G @ B).reshape(x.shape)
        a_max = A.reshape(x.shape).abs().amax(-1, keepdim=True)
        ev["from"] = "the matmul's own operands"
    else:  # no matmul seen: the recipe's operands
        g2 = g.reshape(-1, g.shape[-1])
        want_d_w = [g2.T @ reference_activation_quant(u_fn(x.detach())).reshape(-1, x.shape[-1]) for u_fn in u_fns]
        d_a, a_max = g @ reference_weight_quant(w), None
        ev["from"] = "the recipe's operands (no matmul seen)"
    want_d_x = []
    for u_fn in u_fns:
        with torch.enable_grad():
            x0 = x.detach().clone().requires_grad_(True)
            u = u_fn(x0)
        # dA/du under the STE: 1 for a dequantized A; for integer levels (or a norm that scales
        # its output) the ratio of A's scale to u's, per token or for the tensor
        ratios = [1.0]
        if a_max is not None:
            ratio = a_max / u.detach().abs().amax(-1, keepdim=True).clamp(min=1e-30)
            ratios += [ratio, float(ratio.median())]
        for r in ratios:
            want_d_x.append(torch.autograd.grad(u, x0, d_a * r, retain_graph=True)[0])
    ev["d_weight_vs_ste"] = min(rel(d_w.double(), want) for want in want_d_w)
    ev["d_input_vs_ste"] = min(rel(x.grad.double(), want) for want in want_d_x)
    tol = 1e-2 if norm["normalizes"] else 1e-3
    ok = ev["d_weight_vs_ste"] < tol and ev["d_input_vs_ste"] < tol and ev["weight_grad_norm"] > 0
    return result(name, ok, ev, "no_ste")


def check_state_in_forward(obs: Observation) -> dict:
    """No module with state, and no norm, is built inside forward(): a norm made there is
    re-created on every call, so its weight (if any) is never trained nor saved."""
    strays = []
    for module, args in obs.strays:
        stateful = next(iter(module.state_dict().values()), None) is not None
        normalizes = False
        if args and torch.is_tensor(args[0]) and args[0].is_floating_point():
            try:
                a = quiet_call(module, args[0])
                normalizes = a.shape == args[0].shape and typical_error(quiet_call(module, 2 * args[0]), a) < 1e-3
            except Exception:  # a stray we cannot call again is judged by its state alone
                pass
        strays.append({"module": type(module).__name__, "has_state": stateful, "normalizes": normalizes})
    ev = {"modules_built_in_forward": strays, "parameters_registered_in_forward": obs.new_parameters}
    if any(s["normalizes"] for s in strays):
        return result("no_state_built_in_forward", False, ev, "norm_in_forward")
    if any(s["has_state"] for s in strays) or obs.new_parameters:
        return result("no_state_built_in_forward", False, ev, "weights_not_trainable")
    return result("no_state_built_in_forward", True, ev)


LAYER_CHECKS = ("weights_ternary", "activations_int8", "per_token_scale", "output_matches_recipe",
                "ste_gradients", "bias_used", "no_state_built_in_forward")


def probe_layer(layer: nn.Module, in_features: int | None = None, out_features: int | None = None,
                seed: int = 0) -> list[dict]:
    """Every layer check on `layer` (modified in place: probe a copy). Dimensions default to
    the layer's in_features/out_features. Raises ValueError when no weight can be found."""
    in_features = in_features or layer.in_features
    out_features = out_features or layer.out_features
    found = latent_weight(layer, in_features, out_features)
    if found is None:
        raise ValueError(f"no ({out_features}, {in_features}) or ({in_features}, {out_features}) weight tensor "
                         f"in {type(layer).__name__}")
    _, weight, transposed = found
    dtype = weight.dtype if weight.is_floating_point() else torch.float64
    x = token_inputs((2, 8, in_features), seed).to(dtype)
    bias_result, bias = check_bias(layer, bias_parameter(layer, out_features), x)
    g = torch.randn(2, 8, out_features, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    for p in layer.parameters():
        p.grad = None
    x_in = x.clone().requires_grad_(True)
    obs = observe(layer, x_in, in_features, out_features, grad=g)
    y = obs.output
    call = obs.calls[0] if obs.calls else None
    w = (weight.detach().T if transposed else weight.detach()).double()
    norm = input_normalized(layer, x, y, bias)
    weights = check_weight_operand(call, w)
    checks = [weights, check_activation_operand(call, y), check_per_token(layer, x, y),
              check_output(y.double(), x.double(), w, None if bias is None else bias.double(), norm, weights),
              check_gradients(layer, weight, transposed, x_in, g, obs, norm), bias_result,
              check_state_in_forward(obs)]
    checks[3]["evidence"]["printed_lines"] = obs.printed.count("\n")
    return checks


def layer_problems(checks: list[dict]) -> list[str]:
    """The distinct problems the failed checks name, in check order (unnamed failures skipped)."""
    return list(dict.fromkeys(c["suspected_bug"] for c in checks if not c["passed"] and c["suspected_bug"]))
