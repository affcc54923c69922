"""The straight-through check of one quantized layer (layer_probes.probe_layer calls it): the
gradients that reach the latent weight and the input are compared with the STE of the operands
the layer's matmul actually received, through whatever the layer applies before its quantizer."""
import torch
import torch.nn as nn

from .reference import named, one_magnitude, reference_activation_quant, reference_weight_quant, rel, typical_error
from .watch import Observation


def scalar_fit(got: torch.Tensor, want: torch.Tensor) -> float:
    """The least-squares c with got ~ c * want (1 when want is zero)."""
    got, want = got.double().reshape(-1), want.double().reshape(-1)
    return 1.0 if float(want.norm()) == 0.0 else float(got @ want / (want @ want))


def grad_error(got, want) -> float:
    """The input gradient's error, per token at the 90th percentile: one token whose largest
    value a clamp cut off from the gradient is not the verdict; a missing STE is."""
    got, want = got.double(), want.double()
    if float(want.norm()) == 0.0:
        return 0.0 if float(got.norm()) == 0.0 else 1.0
    return typical_error(got, want)


def check_gradients(layer, weight, transposed, x, g, obs: Observation, u_fns: dict, normalizes: bool) -> dict:
    """Backward is the straight-through one: with G the gradient arriving at the matmul's output
    and A, B what it multiplied, dL/dW = G^T A (times 1/mean|W| when B holds integer levels) and
    dL/dx = (G B) passed back through the quantizer as identity and through whatever the layer
    applies before it (its own norm, with its gain). A gradient off by one factor for the whole
    tensor is the STE still (Adam does not see it): a deviation, with its factor."""
    name = "ste_gradients"
    if not weight.requires_grad or not isinstance(weight, nn.Parameter):
        return named(name, {"why": "the latent weight is not a trainable parameter"}, ["weights_not_trainable"])
    d_w = None if weight.grad is None else (weight.grad.T if transposed else weight.grad)
    if d_w is None:
        return named(name, {"why": "the latent weight gets no gradient"}, ["weights_not_trainable"])
    if x.grad is None:
        return named(name, {"why": "no gradient reaches the input"}, ["no_ste"])
    ev = {"weight_grad_norm": float(d_w.norm()), "input_grad_norm": float(x.grad.norm())}
    if not (torch.isfinite(d_w).all() and torch.isfinite(x.grad).all()):
        return named(name, {**ev, "why": "non-finite gradient"}, ["no_ste"])
    w = weight.detach().T if transposed else weight.detach()
    mean_abs = float(w.abs().mean().clamp(min=1e-5))
    call = next((c for c in obs.calls if c.grad_output is not None), None)
    accepted_w = [1.0]  # dL/dW over G^T A: 1, or B's magnitude over mean|W| (B in other units, e.g. integer levels)
    if call is not None:
        G, A, B = (t.double().reshape(-1, t.shape[-1]) for t in (call.grad_output, call.activation, call.weight))
        want_d_w = [G.T @ A]
        if one_magnitude(B):
            accepted_w.append(float(B.abs().max()) / mean_abs)
        else:  # one scale per row: B's row magnitude over the row's mean|W|, per row
            row_scale = B.abs().amax(1, keepdim=True) / w.abs().mean(1, keepdim=True).clamp(min=1e-5)
            want_d_w.append(row_scale * (G.T @ A))
        if one_magnitude(B) and not one_magnitude(w.abs().mean(1)):  # integer levels in a per-row pattern
            want_d_w.append((G.T @ A) / w.abs().mean(1, keepdim=True).clamp(min=1e-5))
        d_a = (G @ B).reshape(x.shape)
        a_max = A.reshape(x.shape).abs().amax(-1, keepdim=True)
        ev["from"] = "the matmul's own operands"
    else:  # no matmul seen (or none in the graph, as in a fused autograd.Function): the recipe's operands
        g2 = g.reshape(-1, g.shape[-1]).double()
        with torch.no_grad():
            want_d_w = [g2.T @ reference_activation_quant(u_fn(x.detach()).double()).reshape(-1, x.shape[-1])
                        for u_fn in u_fns.values()]
        d_a, a_max = g.double() @ reference_weight_quant(w.double()), None
        ev["from"] = "the recipe's operands (no matmul seen)"
    want_d_x = []
    for u_fn in u_fns.values():
        with torch.enable_grad():
            x0 = x.detach().clone().requires_grad_(True)
            u = u_fn(x0)
        # dA/du under the STE: 1 for a dequantized A; for integer levels (or a norm that scales
        # its output) the ratio of A's scale to u's, per token
        ratios = [1.0]
        if a_max is not None:
            u_max = u.detach().abs().amax(-1, keepdim=True).clamp(min=1e-30)
            ratios += [a_max / u_max, float(a_max.max() / u_max.max())]  # per token, or one for the tensor
        for r in ratios:
            want_d_x.append(torch.autograd.grad(u, x0, (d_a * r).to(u.dtype), retain_graph=True)[0])
    tol = 1e-2 if normalizes else 1e-3
    deviations, failed = [], []
    for part, got, wants, accepted in (("weight", d_w, want_d_w, accepted_w), ("input", x.grad, want_d_x, (1.0,))):
        error = grad_error if part == "input" else (lambda a, b: rel(a.double(), b.double()))
        ev[f"d_{part}_vs_ste"] = min(error(got, a * want) for want in wants for a in accepted)
        if ev[f"d_{part}_vs_ste"] < tol:
            continue
        c, err = min(((c, error(got, c * want)) for want in wants for c in [scalar_fit(got, want)]),
                     key=lambda f: f[1])
        if err < tol and c > 0:  # the STE's gradient times one factor for the tensor
            ev[f"d_{part}_over_ste"] = c
            deviations.append({"problem": "grad_scaled_per_tensor", "measured": {f"d_{part}_over_ste": c}})
        else:
            failed.append(part)
    if failed or ev["weight_grad_norm"] == 0:
        return named(name, {**ev, "why": f"not the STE gradient: {', '.join(failed) or 'weight'}"}, ["no_ste"])
    return named(name, ev, (), deviations)
