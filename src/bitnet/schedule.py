"""The learning-rate and weight-decay schedule, and the time budget that sets max_steps from the
measured speed."""
import math
import time
from dataclasses import replace

import torch

from . import distributed
from .config_tiny import BitNetConfig
from .errors import TrainingError


def lr_and_wd(cfg: BitNetConfig, step: int) -> tuple[float, float]:
    """Learning rate and weight decay at `step` (0-based).

    cosine:    linear warmup, then cosine from learning_rate down to learning_rate*min_lr_ratio;
               with restart_steps, in cycles of that many steps after warm-up (the last one takes
               what is left, 0.5-1.5 cycles), cycle k annealing from a peak restart_lr_ratio**k of
               the first: a model whose accuracy rises with each annealing, and that has not
               solved its task by the end of one, gets another chance when time allows.
    two_stage: BitNet b1.58's recipe: warmup, a high constant-ish rate for stage one (linear decay
               to half), then a drop to two_stage_lr_ratio of it with cosine decay and weight
               decay switched off for stage two.
    """
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps, cfg.weight_decay
    if cfg.schedule == "cosine":
        span, start = cfg.max_steps - cfg.warmup_steps, cfg.warmup_steps
        if cfg.restart_steps:  # cycles of restart_steps, the last one 0.5-1.5 of that; each from a lower peak
            cycles = max(1, round(span / cfg.restart_steps))
            k = min(cycles - 1, (step - start) // cfg.restart_steps)
            start += k * cfg.restart_steps
            span = cfg.restart_steps if k < cycles - 1 else cfg.max_steps - start
            peak = floor + (peak - floor) * cfg.restart_lr_ratio ** k
        t = min(1.0, (step - start) / max(1, span))
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t)), cfg.weight_decay
    if cfg.schedule == "two_stage":
        split = int(cfg.max_steps * cfg.two_stage_split)
        if step < split:
            t = (step - cfg.warmup_steps) / max(1, split - cfg.warmup_steps)
            return peak * (1 - 0.5 * t), cfg.weight_decay
        peak2 = peak * cfg.two_stage_lr_ratio
        t = min(1.0, (step - split) / max(1, cfg.max_steps - split))
        return floor + 0.5 * (peak2 - floor) * (1 + math.cos(math.pi * t)), 0.0
    raise TrainingError(f"schedule must be 'cosine' or 'two_stage', got {cfg.schedule!r}")


def apply_schedule(opt: torch.optim.Optimizer, cfg: BitNetConfig, lr: float, wd: float):
    """Set this step's lr and weight decay. Our AdamW's groups take them as they are; a user's
    optimizer (--optimizer) keeps each group's own ratio to the peak: lr = its initial lr x lr /
    learning_rate, and its weight decay is switched off only where the schedule switches ours off."""
    for group in opt.param_groups:
        if "decay" in group:  # make_optimizer's own groups
            group["lr"] = lr
            group["weight_decay"] = wd if group["decay"] else 0.0
        else:
            group["lr"] = group["initial_lr"] * lr / cfg.learning_rate
            if "weight_decay" in group:  # off only where the schedule turns decay off (two_stage's stage two),
                # not because our own weight_decay is 0: the user's optimizer keeps its own decay
                group["weight_decay"] = 0.0 if cfg.weight_decay and not wd else group["initial_weight_decay"]


class TimeBudget:
    """Fits max_steps to `cfg.time_budget_s` from the speed measured during the run.

    The first plan is made when warm-up ends (the learning rate does not depend on max_steps
    before then): steps = what the remaining time buys at the measured seconds per training step,
    less the cost of the evaluations those steps bring. It is made again at every evaluation from
    the speed since the previous plan, so a machine that gets busier or quieter partway through
    buys fewer or more steps (the first steps, compiling and warming caches, stop weighing on it).
    A re-plan that would move the current learning rate by more than `MAX_LR_JUMP` of its peak is
    not taken (late in a cosine, or across a restart's boundary), and none is made once
    `FREEZE_AT` of the planned steps are done: the end of the annealing is left alone. With
    stop_when_solved an easy run still ends early, at its first solved evaluation (unless less than
    one evaluation interval of the schedule is left: then it finishes). `over()` is the hard stop.
    """

    FREEZE_AT = 0.8
    MAX_LR_JUMP = 0.1

    def __init__(self, cfg: BitNetConfig, start_step: int):
        self.budget, self.t0 = cfg.time_budget_s, time.time()
        self.first_plan = start_step + max(cfg.warmup_steps, 20)
        self.frozen = False
        self.rate_from = None  # (step, time, eval seconds so far) once the first steps (and any compile) are behind
        self.eval_s = 0.0  # the latest evaluation's cost
        self.eval_total = 0.0

    @property
    def done(self) -> bool:
        return not self.budget or self.frozen

    def note_eval(self, seconds: float):
        self.eval_s, self.eval_total = seconds, self.eval_total + seconds

    def after_step(self, cfg: BitNetConfig, step: int, start_step: int, ctx=None) -> BitNetConfig:
        if self.done:
            return cfg
        if step == start_step + 5:
            self.rate_from = (step, time.time(), self.eval_total)
        due = step == self.first_plan or (step > self.first_plan and step % cfg.eval_interval == 0)
        if not due or not self.rate_from:
            return cfg
        s0, t_s0, e0 = self.rate_from
        now = time.time()
        sec_per_step = (now - t_s0 - (self.eval_total - e0)) / max(1, step - s0)  # training only
        self.rate_from = (step, now, self.eval_total)  # the next plan measures from here
        remaining = self.budget - (now - self.t0) - 2 * self.eval_s  # the final eval + margin
        steps = max(step + 1, step + int(remaining / (sec_per_step + self.eval_s / cfg.eval_interval)))
        if ctx is not None and ctx.world_size > 1:  # every process takes the slowest one's plan
            steps = int(-distributed.max_over_ranks(torch.tensor(-float(steps)), ctx))
        planned = cfg if steps == cfg.max_steps else replace(cfg, max_steps=steps)
        if step > self.first_plan and abs(lr_and_wd(planned, step)[0] - lr_and_wd(cfg, step)[0]) \
                > self.MAX_LR_JUMP * cfg.learning_rate:
            planned = cfg  # the same on every process: the rates compared come from the shared plan
        self.frozen = step >= self.FREEZE_AT * planned.max_steps
        return planned

    def over(self, ctx=None) -> bool:
        over = bool(self.budget) and time.time() - self.t0 > self.budget - self.eval_s
        return distributed.all_agree(over, ctx) if self.budget and ctx is not None else over
