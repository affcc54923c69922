"""End-of-run diagnosis (what the train scripts call) and `python -m bitnet.diagnose --checkpoint OUT_DIR`."""
import argparse
import os
import sys

import torch
import torch.nn as nn

from ..build import with_data_bug
from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..errors import TrainingError
from ..rundir import CKPT_NAME, METRICS_NAME, find_runs
from ..tasks import task_from_checkpoint
from .detectors import format_scores, learning_summary, prompt_token_pairs, run_detectors
from .health import QuantHealthTracker, summarise_quant_health
from .plots import plot_loss_curves, plot_ternary_fractions, read_metrics
from .probes import run_probes
from .rules import context_free_baseline, learning_kwargs as thresholds_learning_kwargs
from .verdict import format_results, format_verdict, make_verdict, write_verdict


def run_history(run_path: str, ckpt: dict | None = None) -> list[dict]:
    """Evaluation history: metrics.jsonl when the run folder has one, else the checkpoint's copy."""
    folder = run_path if os.path.isdir(run_path) else os.path.dirname(run_path)
    metrics = os.path.join(folder, "metrics.jsonl")
    if os.path.exists(metrics):
        return read_metrics(metrics)[1]
    return list((ckpt or {}).get("history", []))


def token_namer(task):
    """'id 1 (<bos>)' for a task whose tokenizer lists its tokens (itos), else the bare id."""
    itos = getattr(getattr(task, "tok", None), "itos", None)
    return (lambda i: f"id {i} ({itos[i]!r})" if 0 <= i < len(itos) else f"id {i}") if itos else (lambda i: f"id {i}")


def diagnose_run(model: nn.Module, history: list[dict], twin_history: list[dict] | None = None,
                 out_dir: str | None = None, metrics_paths: dict[str, str] | None = None,
                 samples: list[str] | None = None, known_words: set[str] | None = None,
                 arithmetic_answers: list[str] | None = None, batch=None, log=print,
                 learning_kwargs: dict | None = None, stack: dict | None = None, task=None, amend=None) -> dict:
    """Probes, detectors and verdict at the end of a run (what a train script calls).

    `history`/`twin_history`: the runs' evaluation dicts; `metrics_paths`: {label: metrics.jsonl}
    for the pictures, ternary first. With `out_dir`, verdict.json and the PNGs are written there.
    `stack` ({"parts": {part: SPEC}, "twin": description}, a run with the user's own parts) adds
    verdict["your_stack"], one line on what the run says about those parts (bitnet.plugged).
    `task`, when it scores teacher-forced and greedy answers (format_scores) and encodes its
    prompts for inference (prompt_token_pairs), lets the two train/inference format checks run.
    `amend(probes, verdict) -> verdict` adds an experiment's own rule (--data: verdict.judge_user_data).
    """
    cfg = model.config
    probes = run_probes(model)
    log("\nprobes:\n" + format_results(probes))
    learning_kwargs = learning_kwargs or thresholds_learning_kwargs(getattr(task, "thresholds", None))
    detectors = run_detectors(history, cfg.vocab_size, cfg.warmup_steps, samples=samples, known_words=known_words,
                              arithmetic_answers=arithmetic_answers, model=model, batch=batch,
                              format_hits=format_scores(task, model), prompt_pairs=prompt_token_pairs(task),
                              token_name=token_namer(task), **learning_kwargs)
    log("\ndetectors:\n" + format_results(detectors))
    ternary = learning_summary(history, cfg.vocab_size, cfg.warmup_steps, **learning_kwargs)
    log(f"\n{'ternary' if cfg.quant == 'ternary' else 'this run'}: {ternary['reason']}")
    twin = None
    if twin_history:
        twin = learning_summary(twin_history, cfg.vocab_size, cfg.warmup_steps, **learning_kwargs)
        log(f"twin:    {twin['reason']}")
    # the twin comparison measures progress from what a model whose quantized layers pass nothing on
    # still reaches through its embeddings and head (the previous token's guess)
    baseline = (context_free_baseline(task.get_batch)["loss"] if twin and callable(getattr(task, "get_batch", None))
                else None)
    verdict = make_verdict(probes, ternary, twin, detectors, baseline_loss=baseline)
    verdict = amend(probes, verdict) if amend else verdict
    if stack:
        from ..plugged import stack_statement
        verdict["your_stack"] = {**stack, "statement": stack_statement(stack, verdict, history, twin_history)}
    log("\n" + format_verdict(verdict))
    if stack:
        log("  " + verdict["your_stack"]["statement"])
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
    from ..export import load_any_checkpoint  # a run folder, ckpt.pt, or a transformers BitNet folder
    ternary_path, twin_path, out_dir = find_runs(path)
    ckpt = load_any_checkpoint(ternary_path)
    model = model_from_checkpoint(ckpt)
    step = ckpt.get("step", 0)
    history = run_history(ternary_path, ckpt)
    cfg = model.config
    print(f"run: {ternary_path} (step {step}, quant={cfg.quant}, {type(cfg).__name__}"
          f"{', inject_bug=' + cfg.inject_bug if cfg.inject_bug else ''})")

    # a task that rebuilds itself from the checkpoint gives batches and samples; others: random
    # tokens, and no sample detectors
    task = task_from_checkpoint(ckpt.get("task") or {}, cfg)
    inputs = {}
    if task is not None:
        task = with_data_bug(task, cfg)  # a self-test data bug, as the run trained with it
        inputs = task.diagnosis_inputs(model)
    batch = inputs.get("batch")

    logged = [h for h in history if h.get("quant_health")]
    if not logged:  # the run did not log health: measure the checkpoint now
        tracker = QuantHealthTracker(batch_fn=(lambda: batch) if batch is not None else None)
        logged = [{"step": step, **tracker(model, step)}]
    print("\n" + summarise_quant_health(logged))

    twin_history, twin_ckpt = None, None
    if twin_path is not None:
        twin_ckpt = load_checkpoint(twin_path) if os.path.exists(os.path.join(twin_path, CKPT_NAME)) else None
        twin_history = run_history(twin_path, twin_ckpt)
        print(f"twin run: {twin_path}" if twin_history else f"twin run: {twin_path} has no evaluations; judged without a twin")

    def metrics_of(run_path):
        return os.path.join(run_path if os.path.isdir(run_path) else os.path.dirname(run_path), METRICS_NAME)

    paths = {"ternary": metrics_of(ternary_path)}
    if twin_path is not None:
        paths["fp twin"] = metrics_of(twin_path)
    from ..plugged import parts, twin_kind
    stack = None
    if parts(cfg):  # the user's own layer/model/optimizer: the verdict speaks to them
        twin = twin_kind(model_from_checkpoint(twin_ckpt)) if twin_history and twin_ckpt else None
        stack = {"parts": parts(cfg), "twin": twin}
    return diagnose_run(model, history, twin_history, out_dir=out_dir if write else None, metrics_paths=paths,
                        task=task, stack=stack, learning_kwargs=getattr(task, "learning_kwargs", None), **inputs)


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
        sys.exit(getattr(e, "exit_code", 2))  # 4: disk full
    return verdict
