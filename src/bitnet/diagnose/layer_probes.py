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
The reference is the layer as it is: what the quantizer receives may be the input or the input
through one of the layer's own registered modules (a norm with the gain, eps and bias it has
trained to), found by calling them; a norm with no module (functional, or built in forward) is
found by its effect (the output ignores the input's scale) and tried with unit gain.

The usual mistakes and the harmless conventions are fitted jointly, so a layer with several
faults gets every one named and a convention (a 128 grid, a per-row weight scale, scales applied
after the matmul, a gradient scaled per tensor) is listed as a deviation, never as a bug.
Each check returns `result(...)` (name, passed, evidence, suspected_bug) plus, when it names
several, `problems` and `severity`, and evidence["deviations"] ({"problem", "measured"}); the names,
severities and fixes are those of problems.py.
"""
import torch
import torch.nn as nn

from .problems import is_deviation
from .layer_gradients import check_gradients
from .reference import (badness, deviation_size, fitted_factor, layer_normalized, missing_scales,  # noqa: F401
                        named, on_int8_grid, one_magnitude, output_candidates, result, rms_normalized, spread,
                        typical_error)  # result is re-exported (probes.py)
from .watch import MatmulCall, Observation, captured_stdout, observe, quiet_call


def near(a: float, b: float, tol: float = 1e-3) -> bool:
    return abs(a - b) <= tol * abs(b)


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
    row_mean = w.abs().mean(dim=1, keepdim=True).clamp(min=1e-5)
    if mismatched > 1e-3 and not mean_abs.dim():  # integer levels (one magnitude) in the per-row pattern?
        row_mismatched = float((torch.sign(b) != (w / row_mean).round().clamp(-1, 1)).double().mean())
        if row_mismatched <= 1e-3:
            mean_abs, mismatched, ev["scale_per"] = row_mean, row_mismatched, "output row"
            magnitude = b.abs().amax(dim=1, keepdim=True)
    ev["pattern_mismatch_share"] = mismatched
    if mismatched > 1e-3:
        return result(name, False, {**ev, "why": "ternary pattern differs from round(W/mean|W|)"},
                      "wrong_weight_scale")
    used = magnitude > 0  # rows that rounded to all zeros say nothing about the scale

    def near_all(want_scale) -> bool:
        return bool(((magnitude - want_scale).abs() <= 1e-3 * want_scale)[used.expand_as(magnitude)].all())

    per_row = [{"problem": "per_row_weight_scale", "measured": {"row_scale_min": float(mean_abs.min()),
                                                                "row_scale_max": float(mean_abs.max())}}] \
        if mean_abs.dim() else []
    if near_all(mean_abs.expand_as(magnitude)):
        return named(name, {**ev, "scale": "mean|W| (dequantized)"}, (), per_row)
    if near_all(torch.ones_like(magnitude)):
        return named(name, {**ev, "scale": "1 (integer levels: the output must be rescaled)"}, (), per_row)
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


# ---------------------------------------------------------------------------------------------
# What the quantizer receives: the input, or the input through the layer's own modules


NORMS = {"rms_norm": rms_normalized, "layer_norm": layer_normalized}


def first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def own_input_modules(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> dict:
    """The layer's registered submodules that map its input to a same-shaped, continuous tensor
    (a norm, with the gain, eps and bias it has now: trained, not fresh). Each is called on the
    probe input; a quantizer (its output on a grid), the identity and the module holding the
    weight are left out. Called or not in forward (a fused kernel may read only its weights),
    each is a candidate for what the quantizer receives: the output fits decide."""
    found, outputs = {}, []
    for name, module in layer.named_modules():
        if module is layer or any(p is weight for p in module.parameters()):
            continue
        try:
            u = first_tensor(quiet_call(module, x.clone()))  # a copy: a module may work in place
        except Exception:  # not a module of the input (a projection of another shape, a container)
            continue
        if not torch.is_tensor(u) or u.shape != x.shape or not u.is_floating_point() or not torch.isfinite(u).all():
            continue
        rows = u.reshape(-1, u.shape[-1]).double()
        levels = rows.abs().amax(-1)
        if (on_int8_grid(u) is not None or max(len(r.unique()) for r in rows) <= 3
                or bool(((levels - 127).abs() <= 1e-3).logical_or((levels - 128).abs() <= 1e-3).all())):
            continue  # part of a quantizer: on a grid, or scaled to the int8 range
        if typical_error(u, x) < 1e-9 or any(typical_error(u, v) < 1e-9 for v in outputs):
            continue
        found[f"module {name}"] = module
        outputs.append(u)
    return found


def module_output(module, t):
    """module(t) on a copy of t (a module may work in place), its prints kept out of our output."""
    with captured_stdout([]):
        return first_tensor(module(t.clone()))


def input_candidates(layer, x, weight, normalizes: bool) -> dict:
    """name -> function of x: what the quantizer may receive. The layer's own modules come first,
    then unit-gain norms (for a norm applied without a registered module) when the layer
    ignores its input's scale."""
    fns = {"input": lambda t: t}
    fns.update({k: (lambda t, m=m: module_output(m, t)) for k, m in own_input_modules(layer, x, weight).items()})
    if normalizes:
        fns.update(NORMS)
    return fns


def input_normalized(layer, x, y, bias) -> dict:
    """Does the layer normalize its input (output unchanged when x is scaled by 3) or is it
    linear in the input's scale (output x3)?"""
    b = 0 if bias is None else bias.detach()
    y3 = quiet_call(layer, 3 * x) - b
    y0 = y - b
    return {"normalizes": typical_error(y3, y0) < 1e-3, "scales": typical_error(y3, 3 * y0) < 1e-3}


# ---------------------------------------------------------------------------------------------
# The output, against the recipe and its usual mistakes, taken jointly (reference.py's candidates)


def check_output(y, inputs: dict, w, bias, operands: dict, weight_check: dict) -> dict:
    """The output equals linear(per-token-quantized u, ternary weight) (+ bias), u being what the
    quantizer receives (`inputs`: the input, or the input through the layer's own modules).
    Every combination of the usual mistakes and harmless conventions is fitted to the output,
    exactly and up to a factor per token; the exact fit with the least severe problems names
    them (deviations are listed, never failed); failing that, a fit up to a factor names what the
    factor is: scales never divided back out, or a norm to the wrong scale."""
    name = "output_matches_recipe"
    y = y - (0 if bias is None else bias.detach())
    if float(y.abs().max()) == 0.0:
        return named(name, {"why": "the output is all zeros"}, ["wrong_weight_scale"])
    # least severe explanations first (stable: the recipe, then the input as it is, first), so
    # the first exact fit is the one to report and a correct layer costs one product
    tries = sorted(((u_name, u, c) for u_name, u in inputs.items() for c in output_candidates(w)),
                   key=lambda t: badness(t[2][1]))
    fits = []
    for u_name, u, (c_name, problems, make) in tries:
        want, scales = make(u)
        factor, scaled = fitted_factor(y, want)
        fits.append({"input": u_name, "candidate": c_name, "problems": list(problems), "scales": scales,
                     "error": typical_error(y, want), "scaled_error": scaled, "factor": factor})
        if fits[-1]["error"] < 1e-3:
            break
    if fits[-1]["error"] < 1e-3:
        best = fits[-1]
        ev = {"input": best["input"], "closest": best["candidate"], "relative_error": round(best["error"], 6)}
        deviations = [{"problem": p, "measured": {"output_vs_recipe": round(deviation_size(p, inputs[best["input"]], w), 6)}}
                      for p in best["problems"] if is_deviation(p)]
        if operands.get("integer_levels"):
            deviations.append({"problem": "scales_after_matmul", "measured": operands["integer_levels"]})
        return named(name, ev, best["problems"], deviations)
    ev = {"relative_error": {f["candidate"]: round(f["error"], 6) for f in fits if f["input"] == fits[0]["input"]
                             and f["candidate"] in ("int8 per token x ternary", "not rounded x ternary",
                                                    "int8 per tensor x ternary", "sign x binary")}}
    scaled = [f for f in fits if f["scaled_error"] < 1e-3 and not bool(((f["factor"] - 1).abs() < 1e-2).all())]
    if scaled:
        best = min(scaled, key=lambda f: (badness(f["problems"]), spread(f["factor"])))
        factor = best["factor"]
        missing = missing_scales(factor, best["scales"])
        if missing:
            why, problem = "never divided back out: " + ", ".join(missing), "missing_rescale"
        elif best["input"] in NORMS:
            why, problem = "normalized input has the wrong scale", "wrong_norm_scale"
        else:
            why, problem = "output off by a factor", "wrong_weight_scale"
        ev = {"why": why, "shape_matches": best["candidate"], "input": best["input"],
              "output_over_it_min": float(factor.min()), "output_over_it_max": float(factor.max()), **ev}
        return named(name, ev, best["problems"] + [problem])
    closest = min(fits, key=lambda f: (f["error"], badness(f["problems"])))
    ev["closest"] = closest["candidate"]
    if closest["error"] < 1e-2 and any(not is_deviation(p) for p in closest["problems"]):
        return named(name, ev, closest["problems"])
    return result(name, False, ev, weight_check.get("suspected_bug"))  # unexplained: named by the weights, or not at all


# ---------------------------------------------------------------------------------------------
# The gradients, against the straight-through estimator of the layer's own operands


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


def operand_levels(call: MatmulCall | None, weight_check: dict) -> dict:
    """Integer operands (weights of magnitude 1, activations whose every token tops out at level
    127 or 128): the scales are applied after the matmul, a kernel's convention."""
    if call is None:
        return {}
    levels = {}
    if str(weight_check["evidence"].get("scale", "")).startswith("1 "):
        levels["weight_magnitude"] = 1.0
    a_max = call.activation.double().reshape(-1, call.activation.shape[-1]).abs().amax(-1)
    a_max = a_max[a_max > 0]
    if a_max.numel() and bool(((a_max - 127).abs() <= 1e-3).logical_or((a_max - 128).abs() <= 1e-3).all()):
        levels["activation_max_level"] = float(a_max.max())
    return {"integer_levels": levels} if levels else {}


def probe_layer(layer: nn.Module, in_features: int | None = None, out_features: int | None = None,
                seed: int = 0) -> list[dict]:
    """Every layer check on `layer` (modified in place: probe a copy), in LAYER_CHECKS order.
    Dimensions default to the layer's in_features/out_features. Raises ValueError when no
    weight can be found."""
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
    normalizes = input_normalized(layer, x, y, bias)["normalizes"]
    u_fns = input_candidates(layer, x, weight, normalizes)
    with torch.no_grad():
        inputs = {k: fn(x).double() for k, fn in u_fns.items()}
    weights = check_weight_operand(call, w)
    checks = [weights, check_activation_operand(call, y), check_per_token(layer, x, y),
              check_output(y.double(), inputs, w, None if bias is None else bias.double(), operand_levels(call, weights),
                           weights),
              check_gradients(layer, weight, transposed, x_in, g, obs, u_fns, normalizes), bias_result,
              check_state_in_forward(obs)]
    checks[3]["evidence"]["input_normalized_in_layer"] = normalizes
    checks[3]["evidence"]["printed_lines"] = obs.printed.count("\n")
    return checks


def layer_problems(checks: list[dict]) -> list[str]:
    """The distinct fatal or harmful problems the failed checks name, in check order (unnamed
    failures skipped)."""
    names = [p for c in checks if not c["passed"] for p in c.get("problems") or [c["suspected_bug"]] if p]
    return list(dict.fromkeys(p for p in names if not is_deviation(p)))


def layer_deviations(checks: list[dict]) -> list[dict]:
    """The harmless conventions the checks list, each once ({"problem", "measured"}), with what
    every check measured of it."""
    seen = {}
    for c in checks:
        for d in c["evidence"].get("deviations") or ():
            seen.setdefault(d["problem"], {"problem": d["problem"], "measured": {}})["measured"].update(d["measured"])
    return list(seen.values())
