"""Fail fast: the decisions a run can make before its first step and while it trains.

before_training(): every check that needs no training (the probes, init loss, labels, prompt
format, parameters in the optimizer, NaN at init) on the model and optimizer the run would build.
A fault that makes the verdict BROKEN stops the run there, in seconds, not after its budget.

Watch: the trainer's early-stop hook. Every WATCH_EVERY steps it reads what the pipeline
detectors read (trainer.TrainingSignals) and stops when the evidence is decisive:
  - the median weight RMS fell more than detectors.WEIGHT_COLLAPSE_ALWAYS (100x) since step 0, or
    more than WEIGHT_COLLAPSE_FACTOR (10x) with an optimizer that adds L2 decay to the gradient
    (Adam(weight_decay>0)): no AdamW run does either (< 2x in ours); coupled L2 decay at the CPU
    preset passes 100x by step ~130;
  - trainable parameters still bit-identical to step 0 after MIN_STEPS_UNCHANGED steps: Adam moves
    every parameter with a nonzero gradient by ~lr from its first step;
  - a parent's request (a twin run: the other model stopped, or twin_behind() is decisive).
Non-finite losses and gradients stop the trainer at once already (errors.NonFiniteLoss).

twin_behind(): the twin learns while the ternary model stays near the baseline (the loss reachable
from the previous token alone, rules.context_free_baseline), judged on the
evaluations both runs logged, strictly (half of rules.BEHIND_SHARE, two evaluations in a row, the
second at least 2 x warm-up): a healthy ternary loss curve is S-shaped and early evaluations mislead.
"""
import json
import os

import torch

from .detectors import (WEIGHT_COLLAPSE_ALWAYS, WEIGHT_COLLAPSE_FACTOR, detect_init_loss, detect_label_shift, detect_non_finite,
                        detect_params_not_updated, detect_prompt_format, detect_weight_collapse,
                        prompt_token_pairs)
from .probes import eval_mode, logits_of, next_token_loss, probe_all_parameters_trained, run_probes
from .report import token_namer
from .rules import BEHIND_SHARE, learning_summary, progress_share
from .verdict import format_results, format_verdict, make_verdict, write_verdict

STOP_FILE = "stop_early.json"  # a twin run's parent writes it into a child's OUT_DIR to stop it
WATCH_EVERY = 10  # steps between two looks (the trainer logs train_loss at the same cadence)
MIN_STEPS_UNCHANGED = 50  # a parameter Adam holds and never moved by then had a zero gradient
TWIN_BEHIND_SHARE = BEHIND_SHARE / 2  # a margin on the end-of-run rule


def first_batch(task, cfg):
    return task.get_batch(0, min(cfg.batch_size, 64))


@torch.no_grad()
def init_loss_entry(model, batch) -> dict:
    """The fresh model's loss on the first training batch, as a step-0 history entry."""
    x, y = batch[:2]
    with eval_mode(model):
        loss = float(next_token_loss(logits_of(model, x), y))
    return {"step": 0, "val_loss": loss}


def before_training(model, optimizer, task, cfg) -> dict:
    """The checks that need no training, combined by make_verdict(); returns the verdict (BROKEN
    when one names a fatal or harmful problem; otherwise nothing is decided yet)."""
    skip = getattr(model, "probes_not_applicable", {})
    probes = [probe_all_parameters_trained(model, optimizer)
              if r["name"] == "all_parameters_trained" and r["name"] not in skip else r for r in run_probes(model)]
    batch = first_batch(task, cfg)
    history = [init_loss_entry(model, batch)]
    detectors = [detect_init_loss(history, cfg.vocab_size), detect_non_finite(history, model, batch),
                 detect_label_shift(batch), detect_prompt_format(prompt_token_pairs(task), token_namer(task))]
    verdict = make_verdict(probes, learning_summary([], cfg.vocab_size, cfg.warmup_steps), None, detectors)
    verdict["evidence"]["checked"] = "before training (python -m bitnet.diagnose judges a trained run)"
    return {"verdict": verdict, "probes": probes, "detectors": detectors}


def check_before_training(cfg, task, model, optimizer, out_dir: str, log=print) -> dict | None:
    """before_training() on the model and optimizer the run would start from (build.prepare_run).
    BROKEN: print the findings and the verdict, write verdict.json, and return the verdict (and
    write it to `out_dir`, unless None); otherwise print one line and return None."""
    checked = before_training(model, optimizer, task, cfg)
    verdict = checked["verdict"]
    n = len(checked["probes"]) + len(checked["detectors"])
    if verdict["verdict"] != "BROKEN":
        log(f"before training: {n} checks pass (layers, causal mask, init, labels, prompt format, optimizer)")
        return None
    failed = [r for r in checked["probes"] + checked["detectors"] if not r["passed"]]
    log("\nbefore training, failed checks:\n" + format_results(failed))
    log("\n" + format_verdict(verdict))
    if out_dir is not None:  # None: a torchrun rank other than 0
        log(f"wrote {write_verdict(out_dir, verdict)}")
    log("stopped before the first step (--train-anyway trains regardless)")
    return verdict


class Watch:
    """The trainer's early-stop hook: `watch(run) -> reason | None`, a look every WATCH_EVERY steps
    (see the module docstring). `stop_file`: where a parent asks this run to stop."""

    def __init__(self, stop_file: str | None = None, every: int = WATCH_EVERY):
        self.stop_file, self.every = stop_file, every

    def asked(self) -> str | None:
        """The parent's reason, when its request names this process (not an earlier run in OUT_DIR)."""
        try:
            with open(self.stop_file) as f:
                request = json.load(f)
        except (OSError, ValueError):
            return None
        return request.get("reason") if request.get("pid") == os.getpid() else None

    def __call__(self, run) -> str | None:
        if run.step % self.every:
            return None
        if self.stop_file and (reason := self.asked()):
            return "asked by the twin run: " + reason
        cfg = run.cfg
        now = {"step": run.step, **run.signals(run.model, run.step, run.first_loss, run.loss_ema)}
        history = [h for h in run.history if h.get("step", 0) < run.step] + [now]
        collapse = detect_weight_collapse(history, cfg.vocab_size, cfg.warmup_steps)
        # 100x: beyond any optimizer's healthy run; 10x with an optimizer that adds L2 decay to the
        # gradient, the configuration the verdict names (AdamW runs change < 2x either way)
        limit = WEIGHT_COLLAPSE_FACTOR if collapse["evidence"]["coupled_weight_decay"] else WEIGHT_COLLAPSE_ALWAYS
        if not collapse["passed"] and collapse["evidence"]["fall"] > limit:
            return collapse["evidence"]["finding"]
        if run.step >= MIN_STEPS_UNCHANGED:
            unchanged = detect_params_not_updated(history)
            if not unchanged["passed"]:
                return unchanged["evidence"]["finding"]
        return None


def ask_to_stop(out_dir: str, pid: int, reason: str):
    """A parent's request to process `pid` training in `out_dir` (its Watch stops at its next look)."""
    path = os.path.join(out_dir, STOP_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"reason": reason, "pid": pid}, f)
    os.replace(path + ".tmp", path)


def twin_behind(ternary: list[dict], twin: list[dict], vocab_size: int, warmup_steps: int,
                baseline: float | None, **learning_kwargs) -> str | None:
    """A reason when, at the last two evaluations both runs logged (the second at step >=
    2 x warm-up), the twin learns and the ternary model came less than TWIN_BEHIND_SHARE of the
    twin's way from `baseline` (rules.context_free_baseline) each time; else None."""
    fp_at = {h["step"]: i for i, h in enumerate(twin) if "val_loss" in h}
    common = [(i, fp_at[h["step"]]) for i, h in enumerate(ternary) if "val_loss" in h and h["step"] in fp_at
              and h["step"] > 0]
    if len(common) < 2 or ternary[common[-1][0]]["step"] < 2 * warmup_steps:
        return None
    shares = []
    for i, j in common[-2:]:
        t = learning_summary(ternary[:i + 1], vocab_size, warmup_steps, **learning_kwargs)
        f = learning_summary(twin[:j + 1], vocab_size, warmup_steps, **learning_kwargs)
        p = progress_share(t, f, baseline)
        if t["learns"] or not f["learns"] or p["share"] is None or not p["share"] < TWIN_BEHIND_SHARE:
            return None
        shares.append(p)
    return (f"the twin learns and the ternary model does not: {shares[-1]['reason']}, at two evaluations in a row "
            f"(stops below {TWIN_BEHIND_SHARE:.0%})")
