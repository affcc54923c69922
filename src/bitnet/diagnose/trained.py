"""Checks on a trained causal LM and on the path from a prompt to printed text (check_model).

Every check returns a list of findings, {"name", "where", "evidence"}; the name is a problem in
problems.py (its part, severity and fix come from there). Checks take plain callables so they work
on any model: `logits_of(ids) -> [1, T, V]` for one full forward, `generate(ids, n) -> ids` for the
user's greedy inference path, `encode`/`decode` for the tokenizer.
"""
import math
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from .probes import eval_mode, logits_of  # eval_mode: score the trained model, not its dropout

# ----------------------------------------------------------------------------- the model as a function


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """probes.logits_of, in float32 (the checks compare and score them)."""
    return logits_of(model, ids).float()


def context_length(model: nn.Module, default: int = 256) -> int:
    """The longest input the model takes: our config, a transformers config, or TinyTernaryLM-style
    `c.ctx`; else `default`."""
    for holder in (getattr(model, "config", None), getattr(model, "c", None)):
        for key in ("max_position_embeddings", "n_positions", "ctx", "block_size", "max_seq_len"):
            if isinstance(getattr(holder, key, None), int):
                return getattr(holder, key)
    return default


class quantized_once:
    """Inside, each of our BitLinear layers quantizes its weight once instead of in every forward:
    the same numbers (weight_quant of the same latent), without re-deriving them ~200 times over
    a check. Other layers, the user's included, run as they are."""

    def __init__(self, model: nn.Module):
        from ..bitlinear import BitLinear
        self.layers = [m for m in model.modules() if type(m) is BitLinear]

    def __enter__(self):
        from ..bitlinear import activation_quant, weight_quant
        for m in self.layers:
            w = weight_quant(m.weight.detach())
            m.forward = lambda x, w=w: F.linear(activation_quant(x), w.to(x.dtype))

    def __exit__(self, *exc):
        for m in self.layers:
            del m.forward  # back to the class's forward


@torch.no_grad()
def greedy_reference(model: nn.Module, ids: list[int], n: int) -> list[int]:
    """Our plain greedy loop (no cache): argmax of a full forward, one token at a time."""
    x = torch.tensor([ids])
    for _ in range(n):
        x = torch.cat([x, forward_logits(model, x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0].tolist()

# ----------------------------------------------------------------------------- 1-2: the generation path


@torch.no_grad()
def check_generation(model, generate, prompts: list[list[int]], n_new: int, stop_id=None) -> tuple[list, dict, list]:
    """(findings, evidence, generated ids per prompt). Each prompt is generated twice with the user's
    greedy `generate`; the first continuation is compared, position by position, with the argmax of one
    full forward (eval mode) over prompt + continuation. A differing position is forgiven only when
    the two candidates' logits tie within float noise."""
    findings, outputs, first_diff, compared = [], [], None, 0
    x = torch.tensor([prompts[0]])
    drift = float((forward_logits(model, x) - forward_logits(model, x)).abs().max())
    if drift > 1e-5:  # the model as the user hands it over is random: dropout on (no eval())
        findings.append({"name": "inference_not_deterministic", "where": "model mode (eval() not called)",
                         "evidence": f"two forwards of the same prompt differ by up to {drift:.3g} in the logits "
                                     f"(model.training={model.training}): dropout is on at inference"})
        return findings, {"compared_tokens": 0}, [list(generate(prompts[0], n_new))[len(prompts[0]):]]
    for ids in prompts:
        a, b = list(generate(ids, n_new)), list(generate(ids, n_new))
        new_a, new_b = a[len(ids):], b[len(ids):]
        if a[:len(ids)] != ids:
            findings.append({"name": "generation_mismatch", "where": "generate",
                             "evidence": f"the returned ids do not start with the prompt ({ids[:8]} -> {a[:8]})"})
            return findings, {"compared_tokens": 0}, [new_a]
        if new_a != new_b:
            at = next(i for i, (x, y) in enumerate(zip(new_a + [None], new_b + [None])) if x != y)
            findings.append({"name": "inference_not_deterministic", "where": "generate / model mode",
                             "evidence": f"two greedy calls on the same prompt differ from new token {at} "
                                         f"(model.training={model.training}; dropout or sampling in the greedy path)"})
            return findings, {"compared_tokens": 0, "differs_at": at}, [new_a]
        outputs.append(new_a)
        if stop_id is not None and stop_id in new_a:  # after the stop token a generate may pad: compare up to it
            new_a = new_a[:new_a.index(stop_id) + 1]
        if not new_a:
            continue
        full = torch.tensor([ids + new_a])
        with eval_mode(model):
            logits = forward_logits(model, full[:, :-1])[0, len(ids) - 1:]
        want = logits.argmax(-1).tolist()
        for pos, (got, ref) in enumerate(zip(new_a, want)):
            if got != ref and float(logits[pos, ref] - logits[pos, got]) > 1e-4 * (1 + float(logits[pos].abs().max())):
                first_diff = first_diff or {"prompt_tokens": len(ids), "new_token": pos, "generated": got,
                                            "forward_argmax": ref}
                break
        compared += len(new_a)
    if first_diff:
        d = first_diff
        findings.append({"name": "generation_mismatch", "where": "generate (cache / positions / logits slice)",
                         "evidence": f"new token {d['new_token']} after a {d['prompt_tokens']}-token prompt: generate "
                                     f"gave id {d['generated']}, the full forward's argmax is id "
                                     f"{d['forward_argmax']}"})
    return findings, {"compared_tokens": compared, "first_difference": first_diff}, outputs

# ----------------------------------------------------------------------------- 3: prompt format vs training


@torch.no_grad()
def doc_losses(model, seqs: list[list[int]], score_from: list[int], batch_size: int = 32) -> list[torch.Tensor]:
    """Per-token next-token losses of each sequence from position score_from[i] on (the first
    scored target is seqs[i][score_from[i]]). Rows are right-padded, which a causal model never
    sees from the positions before the padding."""
    out = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    with eval_mode(model):
        for k in range(0, len(order), batch_size):
            chunk = order[k:k + batch_size]
            width = max(len(seqs[i]) for i in chunk)
            x = torch.tensor([seqs[i] + [0] * (width - len(seqs[i])) for i in chunk])
            logits = forward_logits(model, x[:, :-1])
            nll = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(len(chunk), -1)
            for row, i in enumerate(chunk):
                out[i] = nll[row, max(score_from[i] - 1, 0):len(seqs[i]) - 1]
    return out


def check_prompt_format(model, docs: list[str], train_view, infer_view, show, first_tokens: int = 8,
                        max_gap: float = 0.2, max_docs: int = 200) -> tuple[list, dict]:
    """Score the first tokens of each document twice: encoded as training saw it (train_view) and as
    the inference path encodes a prompt (infer_view). Both views end in the same document tokens;
    only the tokens in front differ. A mean gap > 0.2 nats on the first 8 tokens names
    train_inference_mismatch and quotes the differing prefixes."""
    docs = [d for d in docs if d.strip()][:max_docs]
    pairs = [(train_view(d), infer_view(d)) for d in docs]
    same = sum(t == i for t, i in pairs)
    evidence = {"documents": len(pairs), "identical_encodings": same}
    if same == len(pairs):
        evidence["note"] = "the inference path encodes every document exactly as training did"
        return [], evidence

    # score the document tokens that both views share at their end: the first `first_tokens` of them
    t_seqs, i_seqs, t_from, i_from = [], [], [], []
    for t, i in pairs:
        shared = common_suffix(t, i)
        if shared < 2:
            continue
        k = min(first_tokens, shared - 1)
        start_t, start_i = len(t) - shared, len(i) - shared
        t_seqs.append(t[:start_t + k + 1])
        i_seqs.append(i[:start_i + k + 1])
        t_from.append(max(start_t, 1))
        i_from.append(max(start_i, 1))
    if not t_seqs:
        evidence["note"] = "the two encodings share no document tokens to score"
        return [], evidence
    lt = torch.cat(doc_losses(model, t_seqs, t_from)).mean().item()
    li = torch.cat(doc_losses(model, i_seqs, i_from)).mean().item()
    t0, i0 = next((t, i) for t, i in pairs if t != i)
    evidence.update(train_view_loss=lt, inference_view_loss=li, gap_nats=li - lt, first_tokens=first_tokens,
                    max_gap=max_gap, training_starts=show(t0[:6]), inference_starts=show(i0[:6]))
    if li - lt <= max_gap:
        return [], evidence
    return [{"name": "train_inference_mismatch", "where": "prompt encoding",
             "evidence": f"loss on each document's first {first_tokens} tokens: {li:.2f} nats as inference encodes a "
                         f"prompt vs {lt:.2f} as training saw it; inference starts {show(i0[:6])}, training "
                         f"{show(t0[:6])}"}], evidence


def common_suffix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n

# ----------------------------------------------------------------------------- 4: the tokenizer: check_model.tokenizer_roundtrip
# ----------------------------------------------------------------------------- 5: the trained weights


def ternary_stats(w: torch.Tensor) -> dict:
    """The absmean ternary code of a latent weight: shares of -1/0/+1, RMS, and RMS x sqrt(fan_in)
    (a scale-free size: ~0.4 for a 0.02 init at fan_in 384, 0.16-0.4 for 1/sqrt(fan_in) inits)."""
    w = w.detach().float()
    q = (w / w.abs().mean().clamp(min=1e-5)).round().clamp(-1, 1)
    rms = float(w.square().mean().sqrt())
    return {"zero": float((q == 0).float().mean()), "plus": float((q > 0).float().mean()),
            "minus": float((q < 0).float().mean()), "rms": rms, "rms_x_sqrt_fan_in": rms * math.sqrt(w.shape[-1]),
            # exact zeros of a 2-bit layer are its codes, not collapse: only a latent weight has many values
            "tiny_share": float((w.abs() < 1e-5).float().mean()) if w.flatten()[:4096].unique().numel() > 3 else 0.0}


COLLAPSED_SIZE = 0.05  # RMS x sqrt(fan_in); correct runs here stay at 0.3-1, coupled L2 drives it to < 0.05
COLLAPSED_TINY_SHARE = 0.1  # |w| < 1e-5: ~0.02% of a healthy layer; 44-70% after coupled L2 (lab notes)


def check_weights(layers: list[tuple[str, torch.Tensor]], optimizer_hint: str = "") -> tuple[list, dict]:
    """Per quantized layer: all-zero or one-sign ternary codes; latent weights collapsed towards 0
    (median size below COLLAPSED_SIZE, or over 10% of entries |w| < 1e-5), the mark of L2 decay
    added to the gradient."""
    stats = {name: ternary_stats(w) for name, w in layers}
    findings = []
    for name, s in stats.items():
        if s["zero"] > 0.99:
            findings.append({"name": "dead_layer", "where": name,
                             "evidence": f"{s['zero']:.1%} of its ternary weights are 0 (latent RMS {s['rms']:.2g})"})
        elif min(s["plus"], s["minus"]) < 0.01 * (1 - s["zero"]):
            findings.append({"name": "one_sign_layer", "where": name,
                             "evidence": f"+1 {s['plus']:.1%}, -1 {s['minus']:.1%}, 0 {s['zero']:.1%}"})
    if stats:
        sizes = sorted(s["rms_x_sqrt_fan_in"] for s in stats.values())
        median = sizes[len(sizes) // 2]
        collapsed = [n for n, s in stats.items() if s["tiny_share"] > COLLAPSED_TINY_SHARE
                     or s["rms_x_sqrt_fan_in"] < COLLAPSED_SIZE]
        if median < COLLAPSED_SIZE or len(collapsed) > len(stats) // 2:
            worst = min(stats, key=lambda n: stats[n]["rms"])
            findings.append({"name": "coupled_weight_decay" if optimizer_hint else "collapsed_weights",
                             "where": f"{len(collapsed)} of {len(stats)} quantized layers (worst {worst})",
                             "evidence": f"latent weights shrunk towards 0: median RMS x sqrt(fan_in) {median:.3g} "
                                         f"(healthy > {COLLAPSED_SIZE}), {worst} RMS {stats[worst]['rms']:.2g} with "
                                         f"{stats[worst]['tiny_share']:.0%} of entries below 1e-5{optimizer_hint}"})
    evidence = {"layers": len(stats), "zero_share_range": [min((s["zero"] for s in stats.values()), default=None),
                                                          max((s["zero"] for s in stats.values()), default=None)]}
    return findings, evidence


@torch.no_grad()
def check_activations(model, modules: list[tuple[str, nn.Module]], batch: torch.Tensor,
                      max_zero_share: float = 0.9) -> tuple[list, dict]:
    """On real text, the input of each quantized layer on its per-token int8 grid: when outliers set
    absmax, most non-zero entries round to 0. Over 90% names activation_outliers (a Gaussian input
    loses ~1%; the squared-ReLU input of our down_proj up to ~55% in a correct run, so the bar is high)."""
    shares, hooks = {}, []

    def hook(name):
        def fn(module, args):
            x = args[0].detach().float()
            scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
            nonzero = x != 0  # exact zeros (a ReLU's) lose nothing; count the values the grid wipes out
            shares[name] = float(((x * scale).round() == 0)[nonzero].float().mean()) if nonzero.any() else 0.0
        return fn
    for name, m in modules:
        hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        with eval_mode(model):
            forward_logits(model, batch)
    finally:
        for h in hooks:
            h.remove()
    bad = {n: s for n, s in shares.items() if s > max_zero_share}
    findings = [{"name": "activation_outliers", "where": n,
                 "evidence": f"{s:.0%} of its int8 input entries round to 0: a few outliers set the per-token absmax"}
                for n, s in sorted(bad.items(), key=lambda kv: -kv[1])[:3]]
    return findings, {"layers": len(shares), "max_zero_share": max(shares.values(), default=None)}


def check_packed_scales(packed_layers: dict, latent: dict) -> tuple[list, dict]:
    """2-bit layers against the online quantization of their latent weights, where both exist:
    {name: (ternary q, weight_scale)} vs {name: latent W}. The codes must agree and the scale must be
    mean|W|; a scale equal to 1/mean|W| is the inverted convention."""
    findings, compared, inverted, codes_differ = [], 0, [], []
    for name, (q, scale) in packed_layers.items():
        w = latent.get(name)
        if w is None:
            continue
        compared += 1
        w = w.float()
        mean_abs = float(w.abs().mean().clamp(min=1e-5))
        want_q = (w / mean_abs).round().clamp(-1, 1)
        s = float(scale.reshape(-1)[0])
        if float((want_q != q.float()).float().mean()) > 0.01:
            codes_differ.append(name)
        if not math.isclose(s, mean_abs, rel_tol=1e-3):
            inverted.append((name, s, mean_abs)) if math.isclose(s * mean_abs, 1.0, rel_tol=1e-2) else \
                codes_differ.append(name)
    if inverted:
        name, s, m = inverted[0]
        findings.append({"name": "inverted_weight_scale", "where": f"{len(inverted)} packed layers (first {name})",
                         "evidence": f"weight_scale {s:.4g} is 1/mean|W| of the latent weight ({m:.4g}); the layer "
                                     f"multiplies by it"})
    if codes_differ:
        findings.append({"name": "packed_weights_differ", "where": f"{len(codes_differ)} packed layers "
                                                                    f"(first {codes_differ[0]})",
                         "evidence": "the 2-bit codes or scales are not the absmean quantization of the "
                                     "latent weights"})
    return findings, {"compared_layers": compared}

@torch.no_grad()
def check_scale_convention(model, score, min_gain: float = 1.0) -> tuple[list, dict]:
    """Without latent weights: score a few held-out windows with the 2-bit layers' scales as stored
    and inverted (1/weight_scale). A model that does much better inverted (> 1 nat) holds scales of
    the other convention."""
    from ..packing import PackedBitLinear
    layers = [m for m in model.modules() if isinstance(m, PackedBitLinear)]
    if not layers:
        return [], {}
    as_stored = score()
    for m in layers:
        m.weight_scale.reciprocal_()
    try:
        inverted = score()
    finally:
        for m in layers:
            m.weight_scale.reciprocal_()
    evidence = {"loss_as_stored": as_stored, "loss_scales_inverted": inverted}
    if inverted > as_stored - min_gain:
        return [], evidence
    return [{"name": "inverted_weight_scale", "where": f"{len(layers)} packed layers",
             "evidence": f"held-out loss {as_stored:.2f} nats with weight_scale as stored, {inverted:.2f} with "
                         f"1/weight_scale: the scales hold the other convention"}], evidence


# ----------------------------------------------------------------------------- 6: where the loss stands


def ngram_baselines(token_docs: list[list[int]], vocab: int) -> dict:
    """Unigram and bigram cross-entropy (nats/token) of the held-out text itself, honestly: counted on
    the even-numbered documents, scored on the odd ones; add-0.5 unigram, bigram interpolated with it
    (Dirichlet, alpha = 10)."""
    fit, score = token_docs[0::2], token_docs[1::2] or token_docs[0::2]
    uni, big, ctx = Counter(), Counter(), Counter()
    for d in fit:
        uni.update(d)
        big.update(zip(d, d[1:]))
        ctx.update(d[:-1])
    total, alpha = sum(uni.values()), 10.0

    def p_uni(t):
        return (uni[t] + 0.5) / (total + 0.5 * vocab)
    lu = lb = 0.0
    n = 0
    for d in score:
        for a, b in zip(d, d[1:]):
            pu = p_uni(b)
            lu -= math.log(pu)
            lb -= math.log((big[(a, b)] + alpha * pu) / (ctx[a] + alpha))
            n += 1
    return {"unigram": lu / max(n, 1), "bigram": lb / max(n, 1), "tokens": n}


@torch.no_grad()
def heldout_loss(model, token_docs: list[list[int]], prefix: list[int], context: int, n_bytes: int,
                 max_tokens: int = 100_000, batch_size: int = 16) -> dict:
    """Mean next-token loss over the held-out stream as training lays it out (prefix + document, one
    after another), in windows of `context`, and bits per byte of the documents' text (n_bytes)."""
    stream = [t for d in token_docs for t in prefix + d]
    n = min(len(stream) - 1, max_tokens)
    windows = [stream[s:s + context + 1] for s in range(0, n, context)]
    nats, count = 0.0, 0
    with eval_mode(model):
        for length in sorted({len(w) for w in windows}):
            same = [w for w in windows if len(w) == length and length > 1]
            for k in range(0, len(same), batch_size):
                x = torch.tensor(same[k:k + batch_size])
                logits = forward_logits(model, x[:, :-1])
                nats += float(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
                count += x[:, 1:].numel()
    share = count / max(len(stream) - 1, 1)  # scored share of the stream: scale the bytes alike
    return {"val_loss": nats / max(count, 1), "bits_per_byte": nats / math.log(2) / max(n_bytes * share, 1),
            "tokens": count}
