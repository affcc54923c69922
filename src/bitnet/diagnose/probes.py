"""Probes: check a model instance directly, no training.

Every quantized layer goes through the layer probes (layer_probes.py, the same code that
`python -m bitnet.check_layer` runs on a single layer); then three probes look at the whole
model: every parameter gets a gradient and nothing with state is built in forward(), every
block keeps its residual path, and at initialisation the ternary model's hidden state has
about the full-precision twin's scale.
"""
import contextlib
import copy
import re
from collections import Counter
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bitlinear import BitLinear
from .layer_probes import LAYER_CHECKS, probe_layer, result


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's quantized projections: instances of its `linear_cls` (BitLinear by default);
    none in a full-precision model."""
    if getattr(getattr(model, "config", None), "quant", "ternary") == "none":
        return []
    cls = getattr(model, "linear_cls", BitLinear)
    cls = cls if isinstance(cls, (type, tuple)) else BitLinear  # a plugged-in model may name several classes
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


def float64_copy(layer: nn.Module) -> nn.Module:
    """A CPU float64 copy: at double precision the recipe and any equivalent implementation agree
    to ~1e-15, and a rounding tie that would make them differ has probability ~0."""
    layer = copy.deepcopy(layer).to(device="cpu", dtype=torch.float64).eval()
    for p in layer.parameters():
        p.grad = None
    return layer


HEALTHY_WEIGHT_RMS = 0.02  # our init (initializer_range); any working init is within ~5x of it


def healthy_copies(layer: nn.Module) -> dict[str, nn.Module]:
    """Two copies of a trained layer whose weights are in a healthy state: "fresh" (every module
    reset, each latent matrix drawn N(0, 0.02)) and "rescaled" (the trained matrices, non-finite
    entries zeroed, scaled to RMS 0.02). A fault of the layer's code shows in both; a failure that
    one of them does not show comes from the trained weights (collapsed, blown up, non-finite)."""
    g = torch.Generator().manual_seed(0)
    fresh, rescaled = copy.deepcopy(layer), copy.deepcopy(layer)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # reset_parameters() draws from the global RNG
        for m in fresh.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
        for copy_ in (fresh, rescaled):
            for p in copy_.parameters():
                if p.dim() < 2:
                    p.copy_(torch.where(torch.isfinite(p), p, torch.ones_like(p)))
                    continue
                p.nan_to_num_(0.0, 0.0, 0.0)
                rms = float(p.square().mean().sqrt())
                if copy_ is fresh or rms == 0.0:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * HEALTHY_WEIGHT_RMS)
                else:
                    p.mul_(HEALTHY_WEIGHT_RMS / rms)
    return {"fresh": fresh, "rescaled": rescaled}


def run_layer_probes(model: nn.Module) -> list[dict]:
    """probe_layer() on a float64 copy of every quantized layer, one result per layer check:
    a check passes when every layer passes it and names the problem most failing layers name.

    Causes before consequences: a layer that fails a check is probed again on healthy_copies();
    only a failure that both copies show is the layer's. One that either copy clears is a
    consequence of the trained weights (evidence "consequence_of_weights"; it names no problem).
    Deviations the probes measure (evidence "deviations": [{problem, measured}]) are gathered."""
    layers = quantized_layers(model)
    if not layers:
        quant = getattr(getattr(model, "config", None), "quant", None)
        note = ("full-precision model: no quantized layer to check" if quant == "none"
                else f"no quantized layers although quant={quant!r}")
        return [result(name, quant == "none", {"layers_checked": 0, "note": note}) for name in LAYER_CHECKS]
    per_layer, healthy = {}, {}
    for name, layer in layers:
        layer = float64_copy(layer)
        per_layer[name] = probe_layer(layer)
        if any(not c["passed"] for c in per_layer[name]):
            healthy[name] = {how: probe_layer(copy_) for how, copy_ in healthy_copies(layer).items()}
    out = []
    for i, check in enumerate(LAYER_CHECKS):
        failures, consequences = {}, {}
        for name, checks in per_layer.items():
            if checks[i]["passed"]:
                continue
            cleared_by = [how for how, again in healthy.get(name, {}).items() if again[i]["passed"]]
            if cleared_by:
                consequences[name] = {"cleared_by": cleared_by, "would_name": checks[i]["suspected_bug"]}
            else:
                failures[name] = checks[i]
        # every problem a failing layer names (a layer with several faults names them all, worst first)
        suspects = Counter(p for c in failures.values() for p in (c.get("problems") or [c["suspected_bug"]]) if p)
        evidence = {"layers_checked": len(layers), "layers_failed": len(failures),
                    "failures": {n: c["evidence"] for n, c in list(failures.items())[:3]}}  # the first few tell the story
        deviations = {}
        for checks in per_layer.values():
            for d in checks[i]["evidence"].get("deviations") or []:
                deviations.setdefault(d["problem"], d)
        if deviations:
            evidence["deviations"] = list(deviations.values())
        if consequences:
            first = next(iter(consequences.values()))
            evidence["consequence_of_weights"] = {
                "layers": len(consequences), "would_name": first["would_name"], "cleared_by": first["cleared_by"],
                "finding": f"{len(consequences)} layer(s) fail {check} as trained, but pass it with healthy weights "
                           f"({' and '.join(first['cleared_by'])} copy): the trained weights, not the layer's code"}
        if not failures and not consequences:
            evidence["example"] = per_layer[layers[0][0]][i]["evidence"]
        named = [p for p, _ in suspects.most_common()]
        r = result(check, not failures and not consequences, evidence, named[0] if named else None)
        if len(named) > 1:
            r["problems"] = named
        out.append(r)
    return out


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
    """[B, T] -> [B, T, V] logits from any causal LM: ours returns (logits, loss), transformers an
    output with .logits, a plain model a tensor."""
    out = model(input_ids)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "logits", out)


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


def probe_all_parameters_trained(model: nn.Module, optimizer=None) -> dict:
    """A full-model backward reaches every trainable parameter with a finite gradient, and no module
    that owns state runs during forward without being registered in the model (a norm created
    inside forward() is re-initialised on every call and never trained: norm_in_forward).
    With `optimizer` (any torch optimizer) every trainable parameter must also be in one of its
    param_groups (params_not_in_optimizer); after a run, detect_params_not_updated() reads the same
    fact, and which parameters never moved, from the logged history."""
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
    suspect = "norm_in_forward" if (no_grad or stateful_strays) else None
    if optimizer is not None:
        from ..train_signals import params_missing_from_optimizer
        missing = params_missing_from_optimizer(model, optimizer)
        evidence.update(params_not_in_optimizer=missing[:10], n_params_not_in_optimizer=len(missing))
        if missing:
            passed, suspect = False, suspect or "params_not_in_optimizer"
    return result("all_parameters_trained", passed, evidence, suspect)


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
            linear_cls = getattr(model, "linear_cls", None) if quant == cfg.quant else None
            fresh = type(model)(replace(cfg, quant=quant), linear_cls=linear_cls).eval()
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
    return result("init_output_scale", passed, evidence, "missing_rescale" if ratio > high else "wrong_weight_scale")


def vocab_size_of(model: nn.Module) -> int:
    """The vocabulary of any causal LM: its config's vocab_size, else the logits' last dimension."""
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    if v:
        return int(v)
    with eval_mode(model), torch.no_grad():
        return int(logits_of(model, torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)).shape[-1])


def probe_causal_attention(model: nn.Module, seq_len: int = 16, tolerance: float = 1e-6) -> dict:
    """Change the tokens from position k on: the logits of the positions before k must not move.

    The model is a black box (input_ids [B, T] -> logits, or (logits, loss)), run on a float64
    copy where a causal stack reproduces the earlier logits to ~1e-15 (float32 where the model
    does not run in float64, at a looser 1e-3). A position that sees the future -> no_causal_mask.
    """
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", seq_len) or seq_len
    seq_len, vocab = min(seq_len, max_len), vocab_size_of(model)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, vocab, (2, seq_len), generator=g)
    k = seq_len // 2
    changed = ids.clone()
    changed[:, k:] = (ids[:, k:] + torch.randint(1, vocab, (2, seq_len - k), generator=g)) % vocab
    try:
        probe_model, tol = copy.deepcopy(model).to(device="cpu", dtype=torch.float64), tolerance
        with eval_mode(probe_model), torch.no_grad():
            a, b = logits_of(probe_model, ids), logits_of(probe_model, changed)
    except (RuntimeError, TypeError):  # a model that will not run in float64
        probe_model, tol = model, max(tolerance, 1e-3)
        device = next(model.parameters()).device
        with eval_mode(probe_model), torch.no_grad():
            a, b = logits_of(probe_model, ids.to(device)), logits_of(probe_model, changed.to(device))
    a, b = a.float().cpu(), b.float().cpu()
    scale = a[:, :k].abs().max().clamp(min=1e-30)
    early = float((a[:, :k] - b[:, :k]).abs().max() / scale)  # must be ~0: these positions cannot see k
    late = float((a[:, k:] - b[:, k:]).abs().max() / scale)  # a sanity figure: the changed positions move
    passed = early <= tol
    evidence = {"positions": seq_len, "changed_from": k, "earlier_logits_relative_change": early,
                "later_logits_relative_change": late, "tolerance": tol}
    if not passed:
        evidence["finding"] = (f"changing the tokens from position {k} on moved the logits of earlier positions by "
                               f"{early:.2g} (relative; a causal model: 0): attention sees future tokens")
    return result("causal_attention", passed, evidence, None if passed else "no_causal_mask")


MODEL_PROBES = (probe_all_parameters_trained, probe_residual_paths, probe_init_output_scale, probe_causal_attention)
PROBE_NAMES = LAYER_CHECKS + tuple(p.__name__.removeprefix("probe_") for p in MODEL_PROBES)


def run_probes(model: nn.Module) -> list[dict]:
    """The layer checks on every quantized layer, then the model probes; the model is left as it was."""
    skip = getattr(model, "probes_not_applicable", {})  # a plugged-in model (bitnet.plugged) lacks our blocks
    layer_results = run_layer_probes(model)
    model_results = [result(name, True, {"not_applicable": skip[name]}) if name in skip else probe(model)
                     for name, probe in zip(PROBE_NAMES[len(LAYER_CHECKS):], MODEL_PROBES)]
    if any(r["name"] == "per_token_scale" and not r["passed"] for r in layer_results):
        for r in model_results:  # one activation scale over the sequence carries the future into the past
            if r["name"] == "causal_attention" and not r["passed"]:
                r["suspected_bug"] = "per_tensor_act_scale"
                r["evidence"]["finding"] += " (here through an activation scale shared by all tokens, not attention)"
    return layer_results + model_results
