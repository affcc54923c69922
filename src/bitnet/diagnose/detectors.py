"""Run-history detectors: pure functions on a run's evaluation history and on generated samples
(not learning, loss stuck above 5, NaN/Inf, repetitive or gibberish samples, arithmetic answers
that are not numbers). Each returns the `result()` shape of the probes."""
import math
import re

import torch
import torch.nn as nn

from ..words import words_of
from .probes import eval_mode, logits_of, next_token_loss, random_batch, result
from .rules import _finite, learning_summary  # noqa: F401 (learning_summary: its old home)


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


# --- pipeline faults (issue 11): each names a problem, so its failure alone makes the verdict BROKEN.
# They read only generic things: the eval history (with what trainer.TrainingSignals logged), a
# training batch (x, y), and greedy-vs-teacher-forced scores; never our class names.

INIT_LOSS_FACTOR = 2.0  # a fresh model's loss sits near ln V (ours: 3.47-3.6 at V=32); a bad init: tens of nats


def detect_init_loss(history: list[dict], vocab_size: int) -> dict:
    """The first logged loss (the step-0 evaluation, and the first training step's loss) must not
    be far above ln V, the loss of a uniform guess: above 2 ln V (and ln V + 2) the logits at
    initialisation are far too large (N(0, 1) embeddings tied to the head: ~79 nats at V=32)."""
    ln_v = math.log(vocab_size)
    level = max(INIT_LOSS_FACTOR * ln_v, ln_v + 2.0)
    first_eval = next((h["val_loss"] for h in history if h.get("step") == 0 and _finite(h.get("val_loss"))), None)
    first_train = next((h["first_train_loss"] for h in history if _finite(h.get("first_train_loss"))), None)
    seen = [v for v in (first_eval, first_train) if v is not None]
    evidence = {"step0_val_loss": first_eval, "first_train_loss": first_train, "ln_vocab": ln_v, "level": level}
    if not seen:
        return result("init_loss", True, {**evidence, "note": "no step-0 loss logged"})
    worst = max(seen)
    passed = worst <= level
    if not passed:
        evidence["finding"] = (f"the first loss was {worst:.1f} nats, {worst / ln_v:.0f}x ln V = {ln_v:.2f}: the output "
                               f"scale at initialisation is far too large")
    return result("init_loss", passed, evidence, None if passed else "init_scale_too_large")


WEIGHT_COLLAPSE_FACTOR = 10.0  # AdamW at our rates changes the median weight RMS by < 2x in a run
# Beyond 100x no correct AdamW run goes, learning or not (its equilibrium RMS, ~sqrt(lr / wd), is
# above a 0.02 init); coupled decay at the CPU preset: 5,000-50,000x in 400 steps, while a few
# answers (4-8%) are still learned through the norms.
WEIGHT_COLLAPSE_ALWAYS = 100.0


def detect_weight_collapse(history: list[dict], vocab_size: int, warmup_steps: int = 0, **learning_kwargs) -> dict:
    """Weight RMS falling > 10x while the run does not learn, or > 100x at all: weight decay swamps
    the gradient, the signature of L2 decay added to the gradient (torch.optim.Adam(weight_decay=...),
    not AdamW).
    The logged optimizer type and decay, when present, are quoted as further evidence."""
    rms = [(h["step"], h["weight_rms"]) for h in history if _finite(h.get("weight_rms"))]
    optimizer = next((h["optimizer"] for h in reversed(history) if isinstance(h.get("optimizer"), dict)), None)
    coupled = bool(optimizer and not optimizer.get("decoupled_weight_decay") and optimizer.get("max_weight_decay", 0) > 0)
    evidence = {"optimizer": optimizer, "coupled_weight_decay": coupled}
    if len(rms) < 2:
        return result("weight_decay_collapse", True, {**evidence, "note": "no weight RMS logged"})
    (s0, first), (s1, last) = rms[0], rms[-1]
    fall = first / max(last, 1e-30)
    learns = learning_summary(history, vocab_size, warmup_steps, **learning_kwargs)
    evidence.update(first_weight_rms=first, last_weight_rms=last, fall=fall, steps=[s0, s1], learns=learns["learns"],
                    max_fall=WEIGHT_COLLAPSE_FACTOR, max_fall_learning=WEIGHT_COLLAPSE_ALWAYS)
    passed = not (fall > WEIGHT_COLLAPSE_FACTOR and not learns["learns"] or fall > WEIGHT_COLLAPSE_ALWAYS)
    if not passed:
        opt = (f"{optimizer['type']} with weight_decay={optimizer['max_weight_decay']:g} adds L2 to the gradient, and "
               if coupled else "")
        how = (f"while the run did not learn ({learns['reason']})" if not learns["learns"] else
               f"(more than {WEIGHT_COLLAPSE_ALWAYS:.0f}x, which no AdamW run does)")
        evidence["finding"] = (f"{opt}weight RMS fell {fall:,.0f}x ({first:.2g} -> {last:.2g}, steps {s0}-{s1}) {how}: "
                               f"decay swamps the gradient")
    return result("weight_decay_collapse", passed, evidence, None if passed else "coupled_weight_decay")


def detect_label_shift(batch, min_same_share: float = 0.9) -> dict:
    """On a training batch (x, y), y[t] must be the *next* token x[t+1], not x[t]. Fails when >= 90%
    of the labelled positions have y[t] == x[t] and fewer match x[t+1] (real text and arithmetic
    repeat a token at ~2-15% of positions): labels equal to the inputs, never shifted."""
    x, y = (t.detach().cpu() for t in batch[:2])
    mask = y != -100
    n = int(mask.sum())
    if n == 0:
        return result("labels_shifted", True, {"note": "no labelled position in the batch"})
    same = float((y[mask] == x[mask]).float().mean())
    nxt_mask = mask[:, :-1]
    nxt = float((y[:, :-1][nxt_mask] == x[:, 1:][nxt_mask]).float().mean()) if nxt_mask.any() else 0.0
    passed = not (same >= min_same_share and same > nxt)
    evidence = {"labelled_positions": n, "label_equals_input_share": same, "label_equals_next_input_share": nxt,
                "min_same_share": min_same_share}
    if not passed:
        evidence["finding"] = (f"{same:.0%} of the training labels equal the input token at the same position "
                               f"({nxt:.0%} the next one): labels are the inputs, not shifted by one")
    return result("labels_shifted", passed, evidence, None if passed else "unshifted_labels")


def detect_format_mismatch(teacher_forced_hits: list[bool] | None, greedy_hits: list[bool] | None,
                           min_teacher_forced: float = 0.1, max_lost_share: float = 0.5, min_lost: int = 5) -> dict:
    """The same problems scored twice: teacher-forced exact match in the training format, and
    greedy generation prompted the way inference prompts. On one stack greedy decoding yields the
    answer whenever every teacher-forced argmax is right, so a problem right teacher-forced and
    wrong greedy is rare (a near-tie that padding flips). Fails when >= 10% are right
    teacher-forced and at least half of those (and >= 5) are lost by greedy: inference formats
    prompts differently from training (a BOS, a space), or the model saw the answer while
    teacher-forced (no causal mask; that probe then says so)."""
    if not teacher_forced_hits or not greedy_hits or len(teacher_forced_hits) != len(greedy_hits):
        return result("train_inference_format", True, {"note": "no paired teacher-forced and greedy scores"})
    n = len(greedy_hits)
    tf_right = sum(teacher_forced_hits)
    lost = sum(t and not g for t, g in zip(teacher_forced_hits, greedy_hits))
    tf_acc, greedy = tf_right / n, sum(greedy_hits) / n
    passed = not (tf_acc >= min_teacher_forced and lost >= min_lost and lost >= max_lost_share * tf_right)
    evidence = {"problems": n, "teacher_forced_acc": tf_acc, "greedy_acc": greedy, "right_teacher_forced": tf_right,
                "lost_by_greedy": lost, "max_lost_share": max_lost_share}
    if not passed:
        evidence["finding"] = (f"teacher-forced exact match {tf_acc:.0%} but greedy completions {greedy:.0%} on the same "
                               f"{n} problems ({lost} of {tf_right} right teacher-forced are wrong greedy): inference "
                               f"prompts are not formatted as training was")
    return result("train_inference_format", passed, evidence, None if passed else "train_inference_mismatch")


def detect_params_not_updated(history: list[dict]) -> dict:
    """Every trainable parameter must be in the optimizer's param_groups and move during training
    (both logged by trainer.TrainingSignals; the last evaluation decides). Two different facts:
    parameters outside every param group (params_not_in_optimizer, the optimizer's fault), and
    parameters in a group that never moved because their gradient was zero (params_without_gradient:
    a symptom, of an unused module or of a fault upstream that stops the gradient, which the verdict
    names only when no other fault explains it)."""
    judged = [h for h in history if isinstance(h.get("params_unchanged"), list)]
    optimizer = next((h["optimizer"] for h in reversed(history) if isinstance(h.get("optimizer"), dict)), None)
    missing = (optimizer or {}).get("params_not_in_optimizer", [])
    n_missing = (optimizer or {}).get("n_params_not_in_optimizer", len(missing))
    unchanged = judged[-1]["params_unchanged"] if judged else []
    in_groups = [n for n in unchanged if n not in missing] if n_missing <= len(missing) else []
    evidence = {"params_unchanged": unchanged[:10], "n_params_unchanged": len(unchanged),
                "params_not_in_optimizer": missing, "n_params_not_in_optimizer": n_missing,
                "unchanged_in_optimizer": in_groups[:10], "judged_at_step": judged[-1].get("step") if judged else None}
    if not judged and optimizer is None:
        return result("all_parameters_updated", True, {**evidence, "note": "no parameter-change summary logged"})
    passed = not unchanged and not n_missing
    if passed:
        return result("all_parameters_updated", True, evidence)
    parts = []
    if n_missing:
        parts.append(f"{n_missing} trainable parameter(s) are in no optimizer param group (e.g. {missing[0]})")
    if in_groups:
        parts.append(f"{len(in_groups)} in the optimizer never changed from step 0 to step "
                     f"{evidence['judged_at_step']} (e.g. {in_groups[0]}): their gradient was zero")
    elif unchanged:
        parts.append(f"{len(unchanged)} never changed from step 0 to step {evidence['judged_at_step']} "
                     f"(e.g. {unchanged[0]})")
    evidence["finding"] = "; ".join(parts)
    # without a logged optimizer the two facts cannot be told apart; the older, commoner one is named
    outside = n_missing or optimizer is None
    return result("all_parameters_updated", False, evidence,
                  "params_not_in_optimizer" if outside else "params_without_gradient")


INIT_WEIGHT_RMS_FLOOR = 1e-4  # our init: 0.02; PyTorch's default for a 8192-wide Linear: 0.0064


def detect_init_weights(history: list[dict]) -> dict:
    """The weights at step 0 must not be (almost) zero: below ~1e-5 mean|W| the absmean quantizer
    clamps its scale and rounds every weight to 0, and the layers pass nothing on. Fails when the
    median weight RMS logged at the first evaluation is below 1e-4, 60x below any common init."""
    first = next(((h.get("step"), h["weight_rms"]) for h in history if _finite(h.get("weight_rms"))), None)
    evidence = {"first_weight_rms": first and first[1], "at_step": first and first[0], "floor": INIT_WEIGHT_RMS_FLOOR}
    if first is None or first[0] != 0:
        return result("init_weights", True, {**evidence, "note": "no step-0 weight RMS logged"})
    passed = first[1] >= INIT_WEIGHT_RMS_FLOOR
    if not passed:
        evidence["finding"] = (f"at step 0 the median weight RMS was {first[1]:.2g}, below {INIT_WEIGHT_RMS_FLOOR:g}: "
                               f"the weights were initialised to (almost) zero")
    return result("init_weights", passed, evidence, None if passed else "init_scale_too_small")


def prompt_token_pairs(task, n: int = 16) -> list[tuple[list[int], list[int]]] | None:
    """(a training row's first tokens, the inference path's encoding of that row's prompt) for n
    rows of a training batch, for a task that can cut a training row's prompt out as text
    (`prompt_of_row(ids) -> str | None`) and encodes prompts for inference with `prompt_ids(text)`,
    as ArithmeticTask does. None for other tasks. Needs no model: the two formats are compared as
    tokens, so a mismatch shows even where a model happens to shrug it off."""
    if not all(hasattr(task, a) for a in ("get_batch", "prompt_of_row", "prompt_ids")):
        return None
    x = task.get_batch(0, n)[0]
    pairs = []
    for row in x.tolist():
        prompt = task.prompt_of_row(row)
        if prompt is not None:
            ids = list(task.prompt_ids(prompt))
            pairs.append((row[:len(ids)], ids))
    return pairs


def detect_prompt_format(pairs: list[tuple[list[int], list[int]]] | None, token_name=None) -> dict:
    """Training rows must begin exactly as inference encodes the same prompt (prompt_token_pairs()).
    Fails when most rows differ: inference adds or drops a BOS or other special token, or spaces
    the prompt differently, and a model then meets at inference a sequence it never trained on."""
    if not pairs:
        return result("prompt_format", True, {"note": "no training rows with a prompt to compare"})
    name = token_name or str
    bad = [(t, i) for t, i in pairs if list(t) != list(i)]
    passed = len(bad) <= len(pairs) // 2
    evidence = {"rows": len(pairs), "rows_differing": len(bad)}
    if bad:
        train, infer = bad[0]
        evidence.update(example_training_tokens=list(train), example_inference_tokens=list(infer))
        if infer[1:] == train[:len(infer) - 1]:
            how = f"inference puts {name(infer[0])} first, where training rows have no such token"
        elif train[1:] == infer[:len(train) - 1]:
            how = f"training rows start with {name(train[0])}, which inference prompts lack"
        else:
            k = next((k for k, (a, b) in enumerate(zip(train, infer)) if a != b), min(len(train), len(infer)))
            how = (f"at position {k} training has {name(train[k]) if k < len(train) else 'nothing'}, "
                   f"inference {name(infer[k]) if k < len(infer) else 'nothing'}")
        if not passed:
            evidence["finding"] = (f"{len(bad)} of {len(pairs)} training rows do not begin as inference encodes the same "
                                   f"prompt: {how}")
    return result("prompt_format", passed, evidence, None if passed else "train_inference_mismatch")


@torch.no_grad()
def format_scores(task, model, n_per_op: int = 25) -> tuple[list[bool], list[bool]] | None:
    """(teacher-forced hits, greedy hits) on the same problems, for a task that scores both: a
    `domain` that samples problems and writes prompts and answers, `accuracy(model, problems,
    device)` (teacher-forced, training format) and `complete(model, prompt, device)` (the inference
    path), as ArithmeticTask has. None for other tasks."""
    domain = getattr(task, "domain", None)
    if domain is None or not all(hasattr(task, a) for a in ("accuracy", "complete")):
        return None
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(777)
    problems = [p for op in domain.operators for p in domain.sample(n_per_op, g, "train", ops=op)]
    teacher_forced, _ = task.accuracy(model, problems, device)
    greedy = [task.complete(model, domain.prompt(*p), device).strip() == domain.answer(*p) for p in problems]
    return list(teacher_forced), greedy


def run_detectors(history: list[dict], vocab_size: int, warmup_steps: int = 0, samples: list[str] | None = None,
                  known_words: set[str] | None = None, arithmetic_answers: list[str] | None = None,
                  model: nn.Module | None = None, batch=None, format_hits=None, prompt_pairs=None,
                  token_name=None, **learning_kwargs) -> list[dict]:
    """Every detector that the given inputs allow (the history ones always; the others when their
    inputs are given). `format_hits`: format_scores()'s (teacher-forced, greedy) hits;
    `prompt_pairs`: prompt_token_pairs()'s (training, inference) tokens, named by `token_name`."""
    out = [detect_not_learning(history, vocab_size, warmup_steps, **learning_kwargs),
           detect_loss_stuck(history, warmup_steps),
           detect_non_finite(history, model, batch),
           detect_init_loss(history, vocab_size),
           detect_init_weights(history),
           detect_weight_collapse(history, vocab_size, warmup_steps, **learning_kwargs),
           detect_params_not_updated(history)]
    if batch is not None:
        out.append(detect_label_shift(batch))
    if format_hits:
        out.append(detect_format_mismatch(*format_hits))
    if prompt_pairs:
        out.append(detect_prompt_format(prompt_pairs, token_name))
    if samples:
        out.append(detect_repetitive_samples(samples))
        if known_words:
            out.append(detect_gibberish_samples(samples, known_words))
    if arithmetic_answers:
        out.append(detect_non_numeric_answers(arithmetic_answers))
    return out
