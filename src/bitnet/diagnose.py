"""Is the BitNet training stack broken, or are the model and the data mismatched?

Four kinds of evidence, each a named result `{"name", "passed", "evidence", "suspected_bug"}`:

  probes      check a model instance directly, no training: every BitLinear is treated as a
              black box and driven through forward/backward with chosen inputs, and what comes
              out is compared with the b1.58 recipe computed here from first principles.
  detectors   pure functions on a run's evaluation history and on generated samples:
              not learning, loss stuck above 5, NaN/Inf, repetitive or gibberish samples,
              arithmetic answers that are not numbers.
  health      QuantHealthTracker, an `on_eval` hook for the trainer that logs per-layer
              ternary fractions, scales, flip rates, activation saturation, latent-weight
              gradient norms and quantized/latent output ratios.
  verdict     make_verdict() combines probes, the ternary run, its full-precision twin and
              the detectors into OK / BROKEN / INCONCLUSIVE with the evidence.

The recipe every probe checks against (Ma et al. 2024, and their training-tips note):
  weights      s = 1/mean|W| (clamp 1e-5), W_q = round(W*s).clamp(-1, 1) / s, one scale per matrix
  activations  per token s = 127/max|x| over the last dim, x_q = round(x*s).clamp(-128, 127) / s
  gradients    straight-through: dL/dW = g^T x_q and dL/dx = g W_q
  the input of the matmul is quantized, never its output.

Run `python -m bitnet.diagnose --checkpoint OUT_DIR` for a report on an existing run.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bitlinear import BitLinear
from .model import BUGS  # noqa: F401 - re-exported: the names `suspected_bug` uses
from .trainer import (CKPT_NAME, METRICS_NAME, TrainingError, find_runs, load_checkpoint,
                      model_from_checkpoint, write_json_atomic)

# ---------------------------------------------------------------------------------------------
# The recipe, written out again here so that the probes do not trust bitlinear.py


def reference_weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Ternary absmean quantization, dequantized: {-1, 0, +1} * mean|W|."""
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1) / scale


def reference_activation_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) 8-bit absmax quantization, dequantized."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def per_tensor_activation_quant(x: torch.Tensor) -> torch.Tensor:
    """The per_tensor_act mistake: one absmax scale for the whole tensor (a probe candidate)."""
    scale = 127.0 / x.abs().amax().clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def result(name: str, passed: bool, evidence: dict, suspected_bug: str | None = None) -> dict:
    """The one shape every probe and detector returns."""
    return {"name": name, "passed": bool(passed), "evidence": evidence,
            "suspected_bug": None if passed else suspected_bug}


# ---------------------------------------------------------------------------------------------
# Black-box access to one quantized layer


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]


def float64_copy(layer: nn.Module) -> nn.Module:
    """A CPU float64 copy: at double precision the recipe and any equivalent implementation agree
    to ~1e-15, and a rounding tie that would make them differ has probability ~0."""
    layer = copy.deepcopy(layer).to(device="cpu", dtype=torch.float64).eval()
    for p in layer.parameters():
        p.grad = None
    return layer


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


def token_scaled_inputs(layer: nn.Module, scales: torch.Tensor, seed: int) -> torch.Tensor:
    """Random (2, T, in) inputs whose tokens have very different magnitudes, so per-token and
    per-tensor quantization disagree."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, len(scales), layer.in_features, generator=g, dtype=torch.float64)
    return x * scales.to(torch.float64)[None, :, None]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Worst per-token ||got - want|| / ||want|| (0 when both are zero)."""
    got, want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    err = (got - want).norm(dim=-1) / want.norm(dim=-1).clamp(min=1e-30)
    return float(err.max())


def frobenius_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def run_layer_probe(name: str, model: nn.Module, check) -> dict:
    """Apply `check(layer64) -> (ok, evidence, suspected_bug)` to every BitLinear and aggregate:
    the probe passes when every layer does and blames the bug most layers point at."""
    layers = quantized_layers(model)
    if not layers:
        quant = getattr(getattr(model, "config", None), "quant", None)
        if quant == "none":
            return result(name, True, {"layers_checked": 0, "note": "full-precision model: no BitLinear to check"})
        return result(name, False, {"layers_checked": 0, "note": f"no BitLinear layers although quant={quant!r}"})
    failures, suspects = {}, Counter()
    for layer_name, layer in layers:
        ok, evidence, suspect = check(float64_copy(layer))
        if not ok:
            failures[layer_name] = evidence
            suspects[suspect] += 1
    evidence = {"layers_checked": len(layers), "layers_failed": len(failures),
                "failures": dict(list(failures.items())[:3])}  # the first few tell the story
    if not failures:
        evidence["example"] = check(float64_copy(layers[0][1]))[1]
    suspected = suspects.most_common(1)[0][0] if suspects else None
    return result(name, not failures, evidence, suspected)


# ---------------------------------------------------------------------------------------------
# Probes on a model instance


def probe_ternary_weights(model: nn.Module) -> dict:
    """The effective weight is ternary times one scale per matrix, and that scale is mean|W_latent|.

    Fails with no_rescale (magnitude 1), wrong_scale (all weights rounded to zero, or magnitude
    1/mean|W|) or binary_weights (no zeros, two values) when the pattern says which.
    """
    def check(layer):
        w_eff = effective_weight(layer)
        latent = layer.weight.detach()
        want = reference_weight_quant(latent)
        mean_abs = float(latent.abs().mean().clamp(min=1e-5))
        nonzero = w_eff[w_eff != 0].abs()
        magnitudes = (float(nonzero.min()), float(nonzero.max())) if nonzero.numel() else (0.0, 0.0)
        one_scale = nonzero.numel() > 0 and magnitudes[1] - magnitudes[0] <= 1e-6 * magnitudes[1]
        zero_share, want_zero_share = float((w_eff == 0).double().mean()), float((want == 0).double().mean())
        evidence = {"zero_share": zero_share, "expected_zero_share": want_zero_share,
                    "magnitude_min": magnitudes[0], "magnitude_max": magnitudes[1],
                    "expected_magnitude": mean_abs, "one_scale": one_scale,
                    "max_abs_diff": float((w_eff - want).abs().max())}
        ok = bool(torch.allclose(w_eff, want, rtol=1e-6, atol=1e-9 * mean_abs))

        def near(a, b):
            return abs(a - b) <= 1e-3 * abs(b)

        suspect = None
        if not ok:
            if zero_share > 0.99 and want_zero_share < 0.99:
                suspect = "wrong_scale"  # s = mean|W| (~0.02) turns every W*s into ~0
            elif one_scale and near(magnitudes[1], 1.0 / mean_abs):
                suspect = "wrong_scale"
            elif one_scale and near(magnitudes[1], 1.0):
                suspect = "no_rescale"
            elif zero_share == 0.0 and one_scale and want_zero_share > 0:
                suspect = "binary_weights"
        return ok, evidence, suspect

    return run_layer_probe("ternary_weights", model, check)


def probe_per_token_activations(model: nn.Module) -> dict:
    """Activation quantization is per token: blowing up one token (x1000) leaves every other
    token's output bit-for-bit unchanged. A shared scale (per_tensor_act) coarsens all of them."""
    def check(layer):
        x = token_scaled_inputs(layer, torch.ones(6), seed=1)
        changed = (0, 2)
        x_big = x.clone()
        x_big[changed] *= 1000.0
        with torch.no_grad():
            y, y_big = layer(x), layer(x_big)
        others = torch.ones(y.shape[:2], dtype=torch.bool)
        others[changed] = False
        change = float((y_big[others] - y[others]).abs().max() / y[others].abs().max().clamp(min=1e-30))
        return change < 1e-9, {"other_tokens_max_relative_change": change}, "per_tensor_act"

    return run_layer_probe("per_token_activations", model, check)


def probe_quantized_input(model: nn.Module) -> dict:
    """output == linear(per-token-quantized input, effective weight), checked per token.

    On failure the output is compared with the usual mistakes, and the closest names the bug:
    quantize(linear(x, W)) -> quantize_output, per-tensor input -> per_tensor_act.
    """
    def check(layer):
        w_eff = effective_weight(layer)
        x = token_scaled_inputs(layer, torch.logspace(-2, 2, 8), seed=2)  # magnitudes 0.01..100
        with torch.no_grad():
            y = layer(x)
        candidates = {
            "per_token_input": (F.linear(reference_activation_quant(x), w_eff), None),
            "quantized_output": (reference_activation_quant(F.linear(x, w_eff)), "quantize_output"),
            "per_tensor_input": (F.linear(per_tensor_activation_quant(x), w_eff), "per_tensor_act"),
            "unquantized_input": (F.linear(x, w_eff), None),
        }
        errors = {k: relative_error(y, want) for k, (want, _) in candidates.items()}
        ok = errors["per_token_input"] < 1e-6
        closest = min(errors, key=errors.get)
        return ok, {"relative_error": errors, "closest": closest}, candidates[closest][1]

    return run_layer_probe("quantized_input", model, check)


def probe_ste_gradients(model: nn.Module) -> dict:
    """Backward equals the straight-through formula: dW = g^T x_q and dx = g W_q, and dW != 0.

    no_ste shows as a gradient that is zero or follows neither formula; a dW built from the raw
    input means the output, not the input, was quantized (quantize_output).
    """
    def check(layer):
        w_eff = effective_weight(layer)
        x = token_scaled_inputs(layer, torch.linspace(0.5, 3.0, 6), seed=3).requires_grad_(True)
        g = torch.randn(2, 6, layer.out_features, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        layer(x).backward(g)
        d_w, d_x = layer.weight.grad, x.grad

        def outer(inp):  # sum over tokens of g_t^T inp_t: the (out, in) weight gradient
            return torch.einsum("bto,bti->oi", g, inp.detach())

        want_d_x = g @ w_eff
        if d_w is None or d_x is None:
            return False, {"weight_grad_missing": d_w is None, "input_grad_missing": d_x is None}, "no_ste"
        if not (torch.isfinite(d_w).all() and torch.isfinite(d_x).all()):
            return False, {"gradient": "non-finite"}, None
        errors = {"d_weight_vs_ste": frobenius_relative_error(d_w, outer(reference_activation_quant(x))),
                  "d_input_vs_ste": frobenius_relative_error(d_x, want_d_x) if want_d_x.abs().max() > 0
                  else float(d_x.abs().max()),
                  "d_weight_vs_raw_input": frobenius_relative_error(d_w, outer(x)),
                  "d_weight_vs_per_tensor_input": frobenius_relative_error(d_w, outer(per_tensor_activation_quant(x)))}
        evidence = {"relative_error": errors, "weight_grad_norm": float(d_w.norm())}
        ok = errors["d_weight_vs_ste"] < 1e-6 and errors["d_input_vs_ste"] < 1e-6 and float(d_w.norm()) > 0
        if errors["d_weight_vs_raw_input"] < 1e-6:
            suspect = "quantize_output"
        elif errors["d_weight_vs_per_tensor_input"] < 1e-6:
            suspect = "per_tensor_act"
        else:
            suspect = "no_ste"
        return ok, evidence, suspect

    return run_layer_probe("ste_gradients", model, check)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Deterministic forward passes (no dropout), then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids)
    return out[0] if isinstance(out, tuple) else out


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)


def random_batch(model: nn.Module, batch_size: int = 2, seq_len: int = 16, seed: int = 0):
    """Random token ids and labels that fit the model's vocabulary and context."""
    cfg = model.config
    seq_len = min(seq_len, cfg.max_position_embeddings)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=g)
    device = next(model.parameters()).device
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def probe_all_parameters_trained(model: nn.Module) -> dict:
    """A full-model backward reaches every trainable parameter with a finite gradient, and no module
    that owns state runs during forward without being registered in the model (a norm created
    inside forward() is re-initialised on every call and never trained: norm_in_forward)."""
    registered = {id(m) for m in model.modules()}
    strays = []

    def spot_strays(module, args, output):
        if id(module) not in registered:
            strays.append(module)

    x, y = random_batch(model)
    handle = nn.modules.module.register_module_forward_hook(spot_strays)
    try:
        with eval_mode(model), torch.enable_grad():
            loss = next_token_loss(logits_of(model, x), y)
    finally:
        handle.remove()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    no_grad = [n for (n, _), g in zip(named, grads) if g is None]
    non_finite = [n for (n, _), g in zip(named, grads) if g is not None and not torch.isfinite(g).all()]
    # a stray nn.ReLU() is harmless; a stray module with parameters or buffers is state nobody trains or saves
    stateful_strays = [type(m).__name__ for m in strays if next(iter(m.state_dict().values()), None) is not None]
    evidence = {"parameters": len(named), "without_gradient": no_grad[:10], "n_without_gradient": len(no_grad),
                "non_finite_gradient": non_finite[:10],
                "unregistered_modules_with_state": dict(Counter(stateful_strays)),
                "unregistered_stateless_modules": dict(Counter(type(m).__name__ for m in strays
                                                               if type(m).__name__ not in stateful_strays))}
    passed = not no_grad and not non_finite and not stateful_strays
    return result("all_parameters_trained", passed, evidence,
                  "norm_in_forward" if (no_grad or stateful_strays) else None)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    try:
        return list(model.model.layers)  # transformers' naming, which model.py follows
    except AttributeError:
        return [m for n, m in model.named_modules() if re.fullmatch(r"(.*\.)?layers\.\d+", n)]


def probe_residual_paths(model: nn.Module) -> dict:
    """Each block carries its input through: with its output projections (o_proj, down_proj) zeroed,
    a copy of the block must return exactly its input. A block that drops x -> residual_bug."""
    blocks = decoder_blocks(model)
    calls = {}

    def remember(i):
        def hook(module, args, kwargs):
            calls.setdefault(i, (args, kwargs))
        return hook

    handles = [b.register_forward_pre_hook(remember(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with eval_mode(model), torch.no_grad():
            logits_of(model, random_batch(model)[0])
    finally:
        for h in handles:
            h.remove()
    errors, missing = [], []
    g = torch.Generator().manual_seed(5)
    for i, block in enumerate(blocks):
        block = copy.deepcopy(block).eval()
        outputs = [m for n, m in block.named_modules() if n.endswith(("o_proj", "down_proj"))]
        if len(outputs) < 2 or i not in calls:
            missing.append(i)
            continue
        with torch.no_grad():
            for m in outputs:
                m.weight.zero_()
            args, kwargs = calls[i]
            # a unit-scale input: the zeroed branches must contribute nothing next to it
            x = torch.randn(args[0].shape, generator=g).to(args[0])
            out = block(x, *args[1:], **kwargs)
            out = out[0] if isinstance(out, tuple) else out
        errors.append(float((out - x).norm() / x.norm()))
    passed = bool(blocks) and not missing and max(errors) < 1e-2
    evidence = {"blocks": len(blocks), "relative_error_per_block": errors,
                "blocks_without_o_proj_down_proj": missing}
    return result("residual_paths", passed, evidence, "residual_bug" if errors and max(errors) >= 1e-2 else None)


def probe_init_output_scale(model: nn.Module, low: float = 0.25, high: float = 4.0) -> dict:
    """At initialisation the ternary model's residual stream has about the fp twin's scale.

    A fresh pair is built from model.config (quant ternary and none, same seed, so the latent
    weights are identical) and the std of the hidden state entering the final norm is compared
    (the final norm would hide any scale error in the logits). Ternary weights keep about
    sqrt(0.69 * 0.64) = 0.66 of a Gaussian matrix's rms, and correct stacks measure 0.46-0.67
    across our configs; a scale bug is off by 10x or more (wrong_scale < 0.1, no_rescale > 40).
    Outside [low, high] = [0.25, 4], a factor ~2 beyond the correct range: too big ->
    no_rescale, too small -> wrong_scale.
    """
    cfg = model.config
    stds = {}
    for quant in ("ternary", "none"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(getattr(cfg, "seed", 0))
            fresh = type(model)(replace(cfg, quant=quant)).eval()
        captured = []
        last = decoder_blocks(fresh)[-1]
        handle = last.register_forward_hook(lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            logits_of(fresh, random_batch(fresh, batch_size=4)[0])
        handle.remove()
        stds[quant] = float(captured[0].float().std())
    ratio = stds["ternary"] / max(stds["none"], 1e-30)
    passed = low <= ratio <= high
    evidence = {"hidden_std_ternary": stds["ternary"], "hidden_std_fp": stds["none"], "ratio": ratio,
                "allowed": [low, high]}
    return result("init_output_scale", passed, evidence, "no_rescale" if ratio > high else "wrong_scale")


PROBES = (probe_ternary_weights, probe_per_token_activations, probe_quantized_input, probe_ste_gradients,
          probe_all_parameters_trained, probe_residual_paths, probe_init_output_scale)


def run_probes(model: nn.Module) -> list[dict]:
    """Every probe on `model` (fresh or trained); the model is left as it was."""
    return [probe(model) for probe in PROBES]


# ---------------------------------------------------------------------------------------------
# Learning, and the failure detectors (pure functions on histories and sample strings)

LEARNING_MARGIN_SHARE = 0.15  # "clearly below": at least 15% of ln(vocab) ...
LEARNING_MARGIN_MIN = 0.3  # ... and at least 0.3 nats


def learning_summary(history: list[dict], vocab_size: int, warmup_steps: int = 0,
                     baseline_loss: float | None = None, metric: str | None = None,
                     min_metric: float | None = None) -> dict:
    """Does a run learn? The definition the verdict uses:

    A run *learns* when its last evaluation comes after warm-up (step >= warmup_steps, and
    step > 0), its val_loss is finite, and val_loss <= baseline - margin, where baseline is
    ln(vocab_size) (the loss of a uniform guess; pass `baseline_loss` for a stronger one, such as
    the unigram level) and margin = max(0.3, 0.15 * baseline) nats. With `metric` and
    `min_metric` (e.g. "indist_acc", 0.05 for arithmetic) the last evaluation must also reach
    that task metric.

    `history` is a list of evaluation dicts with "step" and "val_loss" (metrics.jsonl "eval"
    lines, or trainer.train()'s "history").
    """
    baseline = math.log(vocab_size) if baseline_loss is None else float(baseline_loss)
    margin = max(LEARNING_MARGIN_MIN, LEARNING_MARGIN_SHARE * baseline)
    threshold = baseline - margin
    summary = {"learns": False, "threshold": threshold, "baseline_loss": baseline, "margin": margin,
               "final_step": None, "final_val_loss": None, "best_val_loss": None}
    evals = [h for h in history if "val_loss" in h]
    if not evals:
        return {**summary, "reason": "no evaluation with a val_loss"}
    last = evals[-1]
    losses = [h["val_loss"] for h in evals if _finite(h["val_loss"])]
    summary.update(final_step=last.get("step"), final_val_loss=last["val_loss"],
                   best_val_loss=min(losses) if losses else None)
    if not last.get("step") or last["step"] < warmup_steps:
        return {**summary, "reason": f"last evaluation at step {last.get('step')} is not after warm-up ({warmup_steps} steps)"}
    if not _finite(last["val_loss"]):
        return {**summary, "reason": f"final val_loss is {last['val_loss']}"}
    if last["val_loss"] > threshold:
        return {**summary, "reason": f"final val_loss {last['val_loss']:.3f} > {threshold:.3f} (ln-vocab baseline "
                                     f"{baseline:.3f} - margin {margin:.2f})"}
    if metric is not None and min_metric is not None:
        value = last.get(metric)
        summary[metric] = value
        if value is None or value < min_metric:
            return {**summary, "reason": f"{metric} = {value} < {min_metric}"}
    return {**summary, "learns": True,
            "reason": f"final val_loss {last['val_loss']:.3f} <= {threshold:.3f} at step {last['step']}"}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def detect_not_learning(history: list[dict], vocab_size: int, warmup_steps: int = 0, **kwargs) -> dict:
    """Fails when the run does not learn in the sense of learning_summary()."""
    summary = learning_summary(history, vocab_size, warmup_steps, **kwargs)
    return result("not_learning", summary["learns"], summary)


def detect_loss_stuck(history: list[dict], warmup_steps: int = 0, level: float = 5.0) -> dict:
    """Fails when evaluations after warm-up exist and none of them got val_loss below `level`
    (5 nats: the seed's sign that a TinyStories run is stuck)."""
    after = [h["val_loss"] for h in history if "val_loss" in h and h.get("step", 0) >= max(1, warmup_steps)]
    best = min((v for v in after if _finite(v)), default=None)  # None: nothing finite to judge
    stuck = bool(after) and (best is None or best > level)
    return result("loss_stuck_above_5" if level == 5.0 else f"loss_stuck_above_{level:g}", not stuck,
                  {"evaluations_after_warmup": len(after), "best_val_loss": best, "level": level})


def _non_finite_entries(obj, path: str = "") -> list[str]:
    """Paths of NaN/Inf numbers anywhere in a (nested) metrics dict."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [path]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite_entries(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _non_finite_entries(v, f"{path}[{i}]")]
    return []


def detect_non_finite(history: list[dict] | None = None, model: nn.Module | None = None, batch=None) -> dict:
    """NaN/Inf in the logged metrics (losses, grad norms, health numbers, or a metrics.jsonl
    "error" line) and, given a model, in any module's output (activations), the loss or any
    gradient of a forward+backward on `batch` (input_ids, labels; random tokens if None)."""
    evidence = {"in_history": [], "in_activations": [], "in_loss": False, "in_gradients": []}
    for entry in history or []:
        if entry.get("kind") == "error" or "error" in entry:
            evidence["in_history"].append(f"step {entry.get('step')}: {entry.get('error')}")
        evidence["in_history"] += [f"step {entry.get('step')}: {p}" for p in _non_finite_entries(entry)]
    if model is not None:
        x, y = batch if batch is not None else random_batch(model, batch_size=4, seq_len=32)
        names = {id(m): n for n, m in model.named_modules()}

        def check_output(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(out) and out.is_floating_point() and not torch.isfinite(out).all():
                evidence["in_activations"].append(names.get(id(module), type(module).__name__))

        handles = [m.register_forward_hook(check_output) for m in model.modules()]
        try:
            with eval_mode(model), torch.enable_grad():
                loss = next_token_loss(logits_of(model, x.to(next(model.parameters()).device)),
                                       y.to(next(model.parameters()).device))
        finally:
            for h in handles:
                h.remove()
        evidence["in_loss"] = not bool(torch.isfinite(loss))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        evidence["in_gradients"] = [n for (n, _), g in zip(named, grads) if g is not None and not torch.isfinite(g).all()]
    evidence = {k: (v[:10] if isinstance(v, list) else v) for k, v in evidence.items()}
    passed = not (evidence["in_history"] or evidence["in_activations"] or evidence["in_loss"] or evidence["in_gradients"])
    return result("non_finite", passed, evidence)


WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words_of(text: str) -> list[str]:
    """Lower-case words (letters and inner apostrophes); numbers and punctuation are dropped."""
    return WORD_RE.findall(text.lower())


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def detect_repetitive_samples(samples: list[str], n: int = 3, max_repeat_rate: float = 0.3,
                              min_distinct_2: float = 0.5) -> dict:
    """Generated text that loops.

    repeat rate: within each sample, the share of word n-grams (n=3) that already occurred
      earlier in it, averaged over samples; real TinyStories stories: median 0.02, 99th
      percentile 0.14.
    distinct-2: unique word bigrams / all bigrams, pooled over samples (Li et al. 2016); real
      stories: median 0.9.
    Fails when repeat rate > 0.3 or distinct-2 < 0.5.
    """
    rates, bigrams = [], []
    for s in samples:
        words = words_of(s)
        grams = ngrams(words, n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
        bigrams += ngrams(words, 2)
    if not rates:
        return result("repetitive_samples", True, {"note": f"no sample has {n} words", "samples": len(samples)})
    repeat_rate = sum(rates) / len(rates)
    distinct_2 = len(set(bigrams)) / len(bigrams)
    passed = repeat_rate <= max_repeat_rate and distinct_2 >= min_distinct_2
    return result("repetitive_samples", passed, {"samples": len(samples), f"repeated_{n}gram_rate": repeat_rate,
                                                 "distinct_2": distinct_2, "max_repeat_rate": max_repeat_rate,
                                                 "min_distinct_2": min_distinct_2})


def load_word_list(path: str, max_chars: int | None = None) -> set[str]:
    """The set of words in a training text file (read up to max_chars characters)."""
    with open(path, encoding="utf-8") as f:
        return set(words_of(f.read(max_chars) if max_chars else f.read()))


def detect_gibberish_samples(samples: list[str], known_words: set[str], max_unknown_share: float = 0.15) -> dict:
    """Fails when more than 15% of the generated words never occur in the training text
    (real held-out TinyStories stories: median 0%, worst of 400 8.5%)."""
    words = [w for s in samples for w in words_of(s)]
    if not words:
        return result("gibberish_samples", True, {"note": "no words in the samples", "samples": len(samples)})
    unknown = [w for w in words if w not in known_words]
    share = len(unknown) / len(words)
    return result("gibberish_samples", share <= max_unknown_share,
                  {"words": len(words), "unknown_share": share, "max_unknown_share": max_unknown_share,
                   "unknown_examples": sorted(set(unknown))[:10]})


SAMPLE_PROMPT_RE = re.compile(r"^\s*\d+\s*[-+*/]\s*\d+\s*=")  # '12 + 7 =' starting a sample line
SAMPLE_MARK_RE = re.compile(r"\s{2}(ok|WRONG, want -?\d+)\s*$")  # how ArithmeticTask.sample_lines ends one


def answer_of(line: str) -> str:
    """The model's answer in a sample line ('12 + 7 = 19  ok' -> '19'); a bare completion is returned stripped."""
    if SAMPLE_PROMPT_RE.match(line):
        line = SAMPLE_MARK_RE.sub("", SAMPLE_PROMPT_RE.sub("", line))
    return line.strip()


def detect_non_numeric_answers(answers: list[str], max_share: float = 0.1) -> dict:
    """Fails when more than 10% of arithmetic answers are not integers (an untrained model
    emits anything; a trained one, right or wrong, emits numbers). Takes completions or
    ArithmeticTask.sample_lines() lines."""
    got = [answer_of(a) for a in answers]
    bad = [a for a in got if not re.fullmatch(r"-?\d+", a)]
    share = len(bad) / len(got) if got else 0.0
    return result("non_numeric_answers", share <= max_share,
                  {"answers": len(got), "non_numeric_share": share, "max_share": max_share, "examples": bad[:5]})


def run_detectors(history: list[dict], vocab_size: int, warmup_steps: int = 0, samples: list[str] | None = None,
                  known_words: set[str] | None = None, arithmetic_answers: list[str] | None = None,
                  model: nn.Module | None = None, batch=None, **learning_kwargs) -> list[dict]:
    """Every detector that the given inputs allow (learning ones always; the others when their
    inputs are given)."""
    out = [detect_not_learning(history, vocab_size, warmup_steps, **learning_kwargs),
           detect_loss_stuck(history, warmup_steps),
           detect_non_finite(history, model, batch)]
    if samples:
        out.append(detect_repetitive_samples(samples))
        if known_words:
            out.append(detect_gibberish_samples(samples, known_words))
    if arithmetic_answers:
        out.append(detect_non_numeric_answers(arithmetic_answers))
    return out


# ---------------------------------------------------------------------------------------------
# Quantization health, logged at each evaluation


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


# ---------------------------------------------------------------------------------------------
# The twin comparison


def unigram_loss(get_batch, n_batches: int = 20, batch_size: int = 32) -> float:
    """Cross-entropy of the best context-free guess (the training targets' own frequencies):
    a model that beats it has learned something beyond token counts."""
    counts = Counter()
    for step in range(n_batches):
        _, y = get_batch(step, batch_size)
        counts.update(y[y != -100].tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def first_step_below(history: list[dict], level: float, key: str = "val_loss") -> int | None:
    return next((h["step"] for h in history if _finite(h.get(key)) and h[key] <= level), None)


def compare_twins(ternary: list[dict], twin: list[dict], milestones: dict[str, float],
                  metric_keys: list[str] = ()) -> tuple[str, dict]:
    """Side by side: final val loss (and task metrics), the gap in nats, and the first evaluated
    step at which each run's val_loss reached each milestone. Returns (printable table, data)."""
    t, f = ternary[-1], twin[-1]
    data = {"ternary_val_loss": t["val_loss"], "twin_val_loss": f["val_loss"],
            "gap_nats": t["val_loss"] - f["val_loss"], "milestones": {}, "metrics": {}}
    rows = [f"{'':34s}{'ternary':>12s}{'fp twin':>12s}",
            f"{'final val loss (step ' + str(t['step']) + ')':34s}{t['val_loss']:12.4f}{f['val_loss']:12.4f}"]
    for key in metric_keys:
        if key in t and key in f:
            data["metrics"][key] = {"ternary": t[key], "twin": f[key]}
            rows.append(f"{key:34s}{t[key]:12.4f}{f[key]:12.4f}")
    for label, level in milestones.items():
        st, sf = first_step_below(ternary, level), first_step_below(twin, level)
        data["milestones"][label] = {"level": level, "ternary_step": st, "twin_step": sf}
        rows.append(f"{'steps to val loss <= ' + label:34s}{str(st if st is not None else '-'):>12s}"
                    f"{str(sf if sf is not None else '-'):>12s}")
    rows.append(f"gap (ternary - twin): {data['gap_nats']:+.4f} nats")
    return "\n".join(rows), data


# ---------------------------------------------------------------------------------------------
# The verdict

NON_FINITE = "non_finite"


def make_verdict(probes: list[dict], ternary_summary: dict, twin_summary: dict | None = None,
                 detectors: list[dict] = ()) -> dict:
    """OK / BROKEN / INCONCLUSIVE, conservatively, in this order:

    1. Any probe fails                              -> BROKEN; suspected_bugs = the probes' suspects.
    2. The ternary run counts as learning when learning_summary() says it learns and its
       non_finite detector passed (a run that hit NaN/Inf did not finish).
    3. With a twin (the same config with quant="none", same data order and seed):
         twin learns, ternary does not              -> BROKEN; failed_checks name the ternary's
                                                       failed detectors; no bug can be named
         ternary learns (twin or not)               -> OK (a twin that did not learn is a warning)
         neither learns                             -> INCONCLUSIVE: a data, pipeline or
                                                       hyper-parameter problem, not BitNet's
    4. Without a twin: ternary learns -> OK, otherwise INCONCLUSIVE (nothing separates a broken
       stack from a hard task).
    Detectors that fail on a run judged OK are listed under evidence["warnings"].

    `ternary_summary` and `twin_summary` come from learning_summary(); `probes` from
    run_probes(); `detectors` (the ternary run's) from run_detectors() or the detect_* functions.
    """
    failed_probes = [p for p in probes if not p["passed"]]
    failed_detectors = [d for d in detectors if not d["passed"]]
    non_finite = any(d["name"] == NON_FINITE for d in failed_detectors)
    ternary_learns = bool(ternary_summary.get("learns")) and not non_finite
    twin_learns = None if twin_summary is None else bool(twin_summary.get("learns"))
    evidence = {"probes": {p["name"]: p["passed"] for p in probes},
                "detectors": {d["name"]: d["passed"] for d in detectors},
                "ternary": ternary_summary, "twin": twin_summary, "ternary_learns": ternary_learns,
                "twin_learns": twin_learns}
    failed_checks, suspected, warnings = [], [], []

    if failed_probes:
        verdict = "BROKEN"
        failed_checks = [p["name"] for p in failed_probes] + [d["name"] for d in failed_detectors]
        suspected = list(dict.fromkeys(p["suspected_bug"] for p in failed_probes if p["suspected_bug"]))
        evidence["failed_probes"] = {p["name"]: p["evidence"] for p in failed_probes}
        reason = "probe(s) failed on the model instance: " + ", ".join(p["name"] for p in failed_probes)
    elif ternary_learns:
        verdict = "OK"
        warnings = [d["name"] for d in failed_detectors]
        if twin_learns is False:
            warnings.append("twin_not_learning")
        reason = "all probes pass and the ternary model learns" + ("" if twin_summary is None else
                                                                  " (twin learns)" if twin_learns else " (twin did not)")
    elif twin_learns:
        verdict = "BROKEN"
        failed_checks = ["ternary_not_learning_while_twin_learns"] + [d["name"] for d in failed_detectors]
        reason = "the full-precision twin learns with the same config and data, the ternary model does not"
    else:
        verdict = "INCONCLUSIVE"
        failed_checks = [d["name"] for d in failed_detectors]
        reason = ("neither the ternary model nor its twin learns: a data, pipeline or hyper-parameter problem, not BitNet"
                  if twin_summary is not None else
                  "the ternary model does not learn and there is no twin to tell a broken stack from a hard task")
    if failed_detectors:
        evidence["failed_detectors"] = {d["name"]: d["evidence"] for d in failed_detectors}
    evidence["warnings"] = warnings
    evidence["reason"] = reason
    return {"verdict": verdict, "failed_checks": failed_checks, "suspected_bugs": suspected, "evidence": evidence}


def write_verdict(out_dir: str, verdict: dict) -> str:
    """OUT_DIR/verdict.json, written to a temporary file and renamed (never half a file)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "verdict.json")
    write_json_atomic(path, verdict, default=str)
    return path


VERDICT_LINES = {"OK": "INFRASTRUCTURE OK", "BROKEN": "INFRASTRUCTURE BROKEN", "INCONCLUSIVE": "INCONCLUSIVE"}


def format_verdict(verdict: dict) -> str:
    lines = [f"verdict: {VERDICT_LINES[verdict['verdict']]}  ({verdict['evidence']['reason']})"]
    if verdict["failed_checks"]:
        lines.append("  failed checks: " + ", ".join(verdict["failed_checks"]))
    if verdict["suspected_bugs"]:
        lines.append("  suspected bugs: " + ", ".join(verdict["suspected_bugs"]))
    if verdict["evidence"].get("warnings"):
        lines.append("  warnings: " + ", ".join(verdict["evidence"]["warnings"]))
    return "\n".join(lines)


def format_results(results: list[dict]) -> str:
    lines = []
    for r in results:
        status = "pass" if r["passed"] else "FAIL" + (f" (suspect {r['suspected_bug']})" if r["suspected_bug"] else "")
        if r["passed"] and r["evidence"].get("layers_checked") == 0:
            status = "n/a (no BitLinear layers)"
        lines.append(f"  {r['name']:<24} {status}")
        if not r["passed"]:
            lines.append(f"      {json.dumps(r['evidence'], default=str)[:400]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Pictures


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of a metrics.jsonl."""
    train, evals = [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                {"train": train, "eval": evals}.get(entry.get("kind"), []).append(entry)
    return train, evals


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_loss_curves(runs: dict[str, str], out_png: str) -> str:
    """Train (thin) and validation (thick, dots) loss per run, e.g. {"ternary": ..., "fp twin": ...}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, path) in enumerate(runs.items()):
        train, evals = read_metrics(path)
        color = f"C{i}"
        if train:
            ax.plot([t["step"] for t in train], [t["train_loss"] for t in train], color=color, alpha=0.35,
                    lw=1, label=f"{label} train")
        if evals:
            ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], color=color, lw=2, marker="o",
                    ms=3, label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title("loss: ternary vs full-precision twin")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_ternary_fractions(metrics_path: str, out_png: str) -> str:
    """One panel per BitLinear: shares of -1 / 0 / +1 over training (needs QuantHealthTracker logs)."""
    _, evals = read_metrics(metrics_path)
    evals = [e for e in evals if e.get("quant_health")]
    if not evals:
        raise ValueError(f"{metrics_path} has no quant_health entries; train with on_eval=QuantHealthTracker(...)")
    layer_names = list(evals[-1]["quant_health"])
    ncols = min(7, len(layer_names))  # one row per block: q k v o gate up down
    nrows = math.ceil(len(layer_names) / ncols)
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 1.9 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    steps = [e["step"] for e in evals]
    for ax, name in zip(axes.flat, layer_names):
        for key, label, color in (("frac_neg", "-1", "C3"), ("frac_zero", "0", "C7"), ("frac_pos", "+1", "C0")):
            ax.plot(steps, [e["quant_health"].get(name, {}).get(key, float("nan")) for e in evals],
                    color=color, label=label)
        ax.set_title(name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", ""), fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(layer_names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("ternary weight fractions per layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------------------
# python -m bitnet.diagnose --checkpoint OUT_DIR


def run_history(run_path: str, ckpt: dict | None = None) -> list[dict]:
    """Evaluation history: metrics.jsonl when the run folder has one, else the checkpoint's copy."""
    folder = run_path if os.path.isdir(run_path) else os.path.dirname(run_path)
    metrics = os.path.join(folder, "metrics.jsonl")
    if os.path.exists(metrics):
        return read_metrics(metrics)[1]
    return list((ckpt or {}).get("history", []))


def arithmetic_answers(task, model, per_operator: int = 5) -> list[str]:
    """Greedy answers to a few training-distribution problems. The prompt includes the space
    after '=': checkpoints trained before that space became a target (data_arithmetic before
    0425256) never learned to emit it, and would otherwise look like they answer nothing."""
    from .data_arithmetic import format_prompt

    g = torch.Generator().manual_seed(12345)
    device = next(model.parameters()).device
    return [task.complete(model, format_prompt(a, op, b).rstrip() + " ", device)
            for op in task.domain.operators for a, _, b in task.domain.sample(per_operator, g, "train", ops=op)]


def diagnose_run(model: nn.Module, history: list[dict], twin_history: list[dict] | None = None,
                 out_dir: str | None = None, metrics_paths: dict[str, str] | None = None,
                 samples: list[str] | None = None, known_words: set[str] | None = None,
                 arithmetic_answers: list[str] | None = None, batch=None, log=print,
                 learning_kwargs: dict | None = None) -> dict:
    """Probes, detectors and verdict at the end of a run (what a train script calls).

    `history`/`twin_history`: the runs' evaluation dicts; `metrics_paths`: {label: metrics.jsonl}
    for the pictures, ternary first. With `out_dir`, verdict.json and the PNGs are written there.
    """
    cfg = model.config
    probes = run_probes(model)
    log("\nprobes:\n" + format_results(probes))
    learning_kwargs = learning_kwargs or {}
    detectors = run_detectors(history, cfg.vocab_size, cfg.warmup_steps, samples=samples, known_words=known_words,
                              arithmetic_answers=arithmetic_answers, model=model, batch=batch, **learning_kwargs)
    log("\ndetectors:\n" + format_results(detectors))
    ternary = learning_summary(history, cfg.vocab_size, cfg.warmup_steps, **learning_kwargs)
    log(f"\n{'ternary' if cfg.quant == 'ternary' else 'this run'}: {ternary['reason']}")
    twin = None
    if twin_history:
        twin = learning_summary(twin_history, cfg.vocab_size, cfg.warmup_steps, **learning_kwargs)
        log(f"twin:    {twin['reason']}")
    verdict = make_verdict(probes, ternary, twin, detectors)
    log("\n" + format_verdict(verdict))
    if out_dir is not None:
        log(f"wrote {write_verdict(out_dir, verdict)}")
        paths = {label: p for label, p in (metrics_paths or {}).items() if p and os.path.exists(p)}
        if paths:
            log(f"wrote {plot_loss_curves(paths, os.path.join(out_dir, 'loss_curves.png'))}")
            first = next(iter(paths.values()))
            if any(e.get("quant_health") for e in read_metrics(first)[1]):
                log(f"wrote {plot_ternary_fractions(first, os.path.join(out_dir, 'ternary_fractions.png'))}")
    return verdict


def diagnose_checkpoint(path: str, write: bool = False) -> dict:
    """Health report, probes, detectors and verdict for an existing run; prints as it goes."""
    ternary_path, twin_path, out_dir = find_runs(path)
    ckpt = load_checkpoint(ternary_path)
    model = model_from_checkpoint(ckpt)
    step = ckpt.get("step", 0)
    history = run_history(ternary_path, ckpt)
    cfg = model.config
    print(f"run: {ternary_path} (step {step}, quant={cfg.quant}, {type(cfg).__name__}"
          f"{', inject_bug=' + cfg.inject_bug if cfg.inject_bug else ''})")

    batch, answers = None, None  # other tasks: random tokens, and no sample detectors
    if (ckpt.get("task") or {}).get("task") == "arithmetic":
        from .data_arithmetic import ArithmeticTask
        task = ArithmeticTask(cfg)
        batch = task.get_batch(0, 16)
        answers = arithmetic_answers(task, model)

    logged = [h for h in history if h.get("quant_health")]
    if not logged:  # the run did not log health: measure the checkpoint now
        tracker = QuantHealthTracker(batch_fn=(lambda: batch) if batch is not None else None)
        logged = [{"step": step, **tracker(model, step)}]
    print("\n" + summarise_quant_health(logged))

    twin_history = None
    if twin_path is not None:
        twin_ckpt = load_checkpoint(twin_path) if os.path.exists(os.path.join(twin_path, CKPT_NAME)) else None
        twin_history = run_history(twin_path, twin_ckpt)
        print(f"twin run: {twin_path}" if twin_history else f"twin run: {twin_path} has no evaluations; judged without a twin")

    def metrics_of(run_path):
        return os.path.join(run_path if os.path.isdir(run_path) else os.path.dirname(run_path), METRICS_NAME)

    paths = {"ternary": metrics_of(ternary_path)}
    if twin_path is not None:
        paths["fp twin"] = metrics_of(twin_path)
    return diagnose_run(model, history, twin_history, out_dir=out_dir if write else None, metrics_paths=paths,
                        arithmetic_answers=answers, batch=batch)


def main(argv=None):
    p = argparse.ArgumentParser(description="Quantization health, probes and a verdict for an existing run.")
    p.add_argument("--checkpoint", required=True, metavar="OUT_DIR",
                   help="a run's --out-dir (holds ckpt.pt), ckpt.pt itself, or a twin-run folder with ternary/ and fp/")
    p.add_argument("--write", action="store_true", help="also write verdict.json and the PNGs into OUT_DIR")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1: a diagnosis is cheap)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        verdict = diagnose_checkpoint(args.checkpoint, write=args.write)
    except (TrainingError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return verdict


if __name__ == "__main__":
    main()
