"""Quantization health, logged at each evaluation: QuantHealthTracker and its summary table."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .probes import eval_mode, logits_of, next_token_loss, quantized_layers, random_batch


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) matrix the layer really multiplies by, recovered from its forward pass.

    Feed the identity: each row is one-hot with max|x| = 1, so 127*x is already an integer and
    per-token quantization leaves it exactly unchanged; row i of the output is then column i of
    the effective weight.
    """
    w = layer.weight
    eye = torch.eye(layer.in_features, dtype=w.dtype, device=w.device)[None]
    with torch.no_grad(), torch.autocast(device_type=w.device.type, enabled=False):
        out = layer(eye)
    return out[0].T.contiguous()


class QuantHealthTracker:
    """`on_eval` hook for trainer.train(): per-BitLinear quantization health at each evaluation.

    Per layer (nested under "quant_health"):
      frac_neg / frac_zero / frac_pos  ternary values of the effective weight (a healthy
                                       absmean layer: roughly 1/3 each, zero a little higher)
      weight_scale                     magnitude of the non-zero effective weights (recipe: mean|W|)
      latent_mean_abs                  mean|W_latent|
      flip_rate                        share of weights whose ternary value changed since the
                                       previous call, divided by the steps in between (None at first)
      act_saturation                   share of per-token-quantized input entries at +-127; absmax
                                       puts one entry per token there, so ~1/in_features is normal
      grad_norm                        norm of dLoss/dW_latent on one batch (0: the STE passes nothing)
      out_ratio                        ||quantized layer output|| / ||latent layer output|| on the
                                       same input (~0.7-1 healthy; >>1 no rescale; ~0 wrong scale)
    Flat means/min/max over layers sit at the top level with a "qh_" prefix.

    `batch_fn() -> (input_ids, labels)` gives the batch; without it random tokens are drawn. Only
    the first `max_rows` rows and `max_tokens` positions are used, to keep a call cheap.
    """

    def __init__(self, batch_fn=None, max_rows: int = 2, max_tokens: int = 64):
        self.batch_fn = batch_fn
        self.max_rows, self.max_tokens = max_rows, max_tokens
        self.previous_signs: dict[str, torch.Tensor] = {}
        self.previous_step: int | None = None
        self.history: list[dict] = []

    def batch(self, model):
        x, y = self.batch_fn() if self.batch_fn is not None else random_batch(model, self.max_rows, self.max_tokens, seed=6)
        device = next(model.parameters()).device
        return x[: self.max_rows, : self.max_tokens].to(device), y[: self.max_rows, : self.max_tokens].to(device)

    def __call__(self, model: nn.Module, step: int) -> dict:
        layers = quantized_layers(model)
        per_layer = {name: {} for name, _ in layers}
        steps_elapsed = None if self.previous_step is None else step - self.previous_step
        for name, layer in layers:
            w_eff = effective_weight(layer).float()
            signs = torch.sign(w_eff).to(torch.int8)
            nonzero = w_eff[w_eff != 0].abs()
            stats = per_layer[name]
            stats["frac_neg"] = float((signs < 0).float().mean())
            stats["frac_zero"] = float((signs == 0).float().mean())
            stats["frac_pos"] = float((signs > 0).float().mean())
            stats["weight_scale"] = float(nonzero.mean()) if nonzero.numel() else 0.0
            stats["latent_mean_abs"] = float(layer.weight.detach().abs().mean())
            previous = self.previous_signs.get(name)
            stats["flip_rate"] = (float((signs != previous).float().mean()) / steps_elapsed
                                  if previous is not None and steps_elapsed and steps_elapsed > 0 else None)
            self.previous_signs[name] = signs

        def measure(name):
            def hook(module, args, output):
                with torch.no_grad():
                    x = args[0].detach().float()
                    q = (x * 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)).round().clamp(-128, 127)
                    latent_out = F.linear(x, module.weight.detach().float())
                    per_layer[name]["act_saturation"] = float((q.abs() >= 127).float().mean())
                    per_layer[name]["out_ratio"] = float(output.detach().float().norm() / latent_out.norm().clamp(min=1e-30))
            return hook

        if layers:
            x, y = self.batch(model)
            handles = [layer.register_forward_hook(measure(name)) for name, layer in layers]
            try:
                with eval_mode(model), torch.enable_grad():
                    loss = next_token_loss(logits_of(model, x), y)
            finally:
                for h in handles:
                    h.remove()
            grads = torch.autograd.grad(loss, [layer.weight for _, layer in layers], allow_unused=True)
            for (name, _), g in zip(layers, grads):
                per_layer[name]["grad_norm"] = 0.0 if g is None else float(g.float().norm())
        self.previous_step = step
        metrics = {**flat_health(per_layer), "quant_health": per_layer}
        self.history.append({"step": step, **metrics})
        return metrics

    def state_dict(self) -> dict:
        """What a resumed run needs for the same flip rates (trainer.train checkpoints it)."""
        return {"previous_signs": dict(self.previous_signs), "previous_step": self.previous_step}

    def load_state_dict(self, state: dict):
        self.previous_signs, self.previous_step = dict(state["previous_signs"]), state["previous_step"]

    def summarise(self, history: list[dict] | None = None) -> str:
        return summarise_quant_health(self.history if history is None else history)


def flat_health(per_layer: dict) -> dict:
    """Means (and the extremes that matter) over layers, for a one-line log."""
    if not per_layer:
        return {}

    def values(key):
        return [s[key] for s in per_layer.values() if s.get(key) is not None]

    def mean(key):
        v = values(key)
        return sum(v) / len(v) if v else None

    return {"qh_frac_neg": mean("frac_neg"), "qh_frac_zero": mean("frac_zero"), "qh_frac_pos": mean("frac_pos"),
            "qh_flip_rate": mean("flip_rate"), "qh_act_saturation": mean("act_saturation"),
            "qh_grad_norm_min": min(values("grad_norm"), default=None),
            "qh_out_ratio_min": min(values("out_ratio"), default=None),
            "qh_out_ratio_max": max(values("out_ratio"), default=None)}


def health_warnings(stats: dict) -> list[str]:
    """Plain-words flags for one layer's latest health numbers."""
    flags = []
    if stats.get("grad_norm") == 0.0:
        flags.append("no gradient reaches the latent weights")
    if stats.get("frac_zero", 1) == 0.0:
        flags.append("no zero weights (binary, not ternary?)")
    if stats.get("frac_zero", 0) > 0.95:
        flags.append("almost all weights are zero")
    ratio = stats.get("out_ratio")
    if ratio is not None and not 0.25 <= ratio <= 4.0:
        flags.append(f"quantized/latent output ratio {ratio:.3g} (scale error?)")
    return flags


def summarise_quant_health(history: list[dict]) -> str:
    """A per-layer table of the latest health numbers, the flip rate over time, and flags."""
    entries = [h for h in history if h.get("quant_health")]
    if not entries:
        return "quantization health: no quant_health entries (full-precision model, or the run did not use QuantHealthTracker)"
    last = entries[-1]
    lines = [f"quantization health at step {last.get('step')} ({len(entries)} evaluations logged)",
             f"{'layer':<34} {'-1':>6} {'0':>6} {'+1':>6} {'scale':>9} {'flips/step':>11} {'sat':>7} "
             f"{'grad':>9} {'out q/lat':>9}"]
    flagged = []
    for name, s in last["quant_health"].items():
        flips = "-" if s.get("flip_rate") is None else f"{s['flip_rate']:.2e}"
        lines.append(f"{name:<34} {s['frac_neg']:>6.3f} {s['frac_zero']:>6.3f} {s['frac_pos']:>6.3f} "
                     f"{s['weight_scale']:>9.3g} {flips:>11} {s.get('act_saturation', float('nan')):>7.4f} "
                     f"{s.get('grad_norm', float('nan')):>9.3g} {s.get('out_ratio', float('nan')):>9.3g}")
        flagged += [f"  {name}: {w}" for w in health_warnings(s)]
    rates = [(h.get("step"), h.get("qh_flip_rate")) for h in entries if h.get("qh_flip_rate") is not None]
    if rates:
        lines.append("mean flip rate per step over time: " + ", ".join(f"{st}: {r:.2e}" for st, r in rates))
    lines.append("flags:" if flagged else "flags: none")
    lines += flagged
    return "\n".join(lines)
