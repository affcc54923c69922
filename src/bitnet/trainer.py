"""The one training loop, shared by every experiment.

An experiment hands over a *task* object with:
  identity() -> dict                    what the checkpoint must remember (tokenizer, task name)
  get_batch(step, batch_size) -> x, y   y = next tokens, -100 where no loss is taken; a pure
                                        function of (seed, step), so a resumed run sees the same data
  evaluate(model, device, step) -> dict metrics; the key "samples" holds printable lines
  format_eval(metrics) -> str           one line for the log
train() reads top to bottom: setup, then per step train_step, log_progress, replan (the time
budget) and after_step (evaluate, save, stop), then finish, all sharing one `Run`. The parts are
in build.py, schedule.py, checkpoint.py, rundir.py, distributed.py and errors.py.
"""
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from . import distributed, plan
from .build import pick_device, training_stack
from .checkpoint import checkpoint_contents, restore_run, save_checkpoint, seed_everything
from .config_tiny import BitNetConfig
from .errors import Interrupted, NonFiniteLoss, TrainingError, stop_requested
from .plugged import parts, shown, twin_kind
from .rundir import CKPT_NAME, METRICS_NAME, append_metrics, forget_metrics_after
from .schedule import TimeBudget, apply_schedule, lr_and_wd
from .train_signals import TrainingSignals


@dataclass
class Run:
    """What the loop reads and changes. A checkpoint keeps what a resume needs (see save())."""
    cfg: BitNetConfig
    task: object
    ctx: distributed.DistContext
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    out_dir: str
    on_eval: object = None
    log: object = print
    quiet: bool = False
    watch: object = None  # watch(run) -> a reason to stop early, or None (diagnose/early.py's Watch)
    stopped_early: str | None = None
    step: int = 0
    history: list = field(default_factory=list)
    first_loss: float | None = None  # the first training step's loss
    loss_ema: float | None = None  # its running mean
    planned: bool = False  # cfg.max_steps was set by the time budget
    keep_previous: bool = True  # the next save keeps the checkpoint it replaces as ckpt.prev.pt
    saved_step: int = 0  # the latest checkpoint on disk
    saved_time: float = 0.0
    t0: float = 0.0  # when training (after the step-0 evaluation) began
    tokens: int = 0
    start_step: int = 0  # where this process began (0, or the resumed step)
    # set up once by setup(), read by the steps
    amp: object = None  # bf16 autocast or a null context
    ddp_model: torch.nn.Module | None = None  # the model, or its DDP wrapper under torchrun
    train_model: torch.nn.Module | None = None  # ddp_model, compiled with cfg.compile
    signals: TrainingSignals | None = None
    budget: TimeBudget | None = None
    solved: object = None  # task.solved(metrics) with stop_when_solved, else None
    flops_per_token: float = 0.0
    peak_flops: float | None = None
    bar: tqdm | None = None

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.out_dir, CKPT_NAME)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.out_dir, METRICS_NAME)

    def record(self, entry: dict):
        """One line of metrics.jsonl (rank 0 alone writes it)."""
        if self.ctx.is_main:
            append_metrics(self.metrics_path, entry)


def train(cfg: BitNetConfig, task, out_dir: str, device: str = "auto", resume: bool = False,
          on_eval=None, quiet: bool = False, watch=None) -> dict:
    """Train a model on `task` and return a summary. `on_eval(model, step) -> dict` adds metrics;
    `watch(run) -> reason | None` stops the run early (evaluated and saved) when it gives a reason.
    `resume`: True continues from OUT_DIR/ckpt.pt; a path, from that checkpoint."""
    run = setup(cfg, task, out_dir, device, resume, on_eval, quiet)
    run.watch = watch
    if run.step == 0 and not run.history:
        evaluate(run)  # the loss at step 0 should sit near ln(vocab_size)
    run.t0 = run.saved_time = time.time()
    run.bar = tqdm(total=run.cfg.max_steps, initial=run.step, desc=f"train {run.cfg.quant}", disable=run.quiet,
                   dynamic_ncols=True, file=sys.stderr, mininterval=2.0)
    try:
        while run.step < run.cfg.max_steps:
            lr, loss, grad_norm = train_step(run)
            log_progress(run, lr, loss, grad_norm)
            replan(run)
            if after_step(run):
                break
    finally:
        run.bar.close()
    return finish(run)


def setup(cfg: BitNetConfig, task, out_dir: str, device: str, resume, on_eval, quiet: bool) -> Run:
    """The process group, the model and optimizer, and the state of a resumed run."""
    ctx = distributed.setup(pick_device(device))  # one process, or this one's place in a torchrun job
    distributed.micro_batch_rows(cfg, ctx.world_size)  # a global batch that does not split: say so before any work
    os.makedirs(out_dir, exist_ok=True)
    quiet = quiet or not ctx.is_main  # only rank 0 logs
    log = (lambda s: None) if quiet else (lambda s: tqdm.write(s, file=sys.stdout))
    seed_everything(cfg.seed)
    model, optimizer, amp = training_stack(cfg, ctx.device)
    run = Run(cfg, task, ctx, model, optimizer, out_dir, on_eval, log, quiet, amp=amp)
    train_state = {}
    if resume:  # True: OUT_DIR/ckpt.pt; a path: that checkpoint (e.g. ckpt.prev.pt when ckpt.pt is damaged)
        source = run.ckpt_path if resume is True else str(resume)
        run.step, run.history, train_state = restore_run(source, cfg, task, model, run.opt, run.metrics_path,
                                                         on_eval, ctx)
        if train_state.get("planned_max_steps"):  # a time-budgeted run keeps the plan it made, and saves it again
            run.cfg = replace(cfg, max_steps=train_state["planned_max_steps"], time_budget_s=0.0)
            run.planned = True
        run.keep_previous = source == run.ckpt_path  # a damaged ckpt.pt must not become the new "previous good" one
        log(f"resumed from {source} at step {run.step}")
    elif ctx.is_main and os.path.exists(run.metrics_path):
        os.remove(run.metrics_path)  # a fresh run starts a fresh log
    run.first_loss, run.loss_ema = train_state.get("first_loss"), train_state.get("loss_ema")
    run.saved_step = run.start_step = run.step
    run.budget = TimeBudget(run.cfg, run.step)
    run.solved = getattr(task, "solved", None) if cfg.stop_when_solved else None
    # The compiled module shares the model's parameters; evaluation and generation use the plain
    # model, whose shapes vary (compiling those would recompile again and again).
    run.ddp_model = distributed.wrap(model, ctx)  # the model itself for one process
    run.train_model = torch.compile(run.ddp_model) if cfg.compile else run.ddp_model
    run.signals = TrainingSignals(model, run.opt, train_state.get("param_fingerprints"))  # a resume judges from step 0 too
    run.flops_per_token, run.peak_flops = plan.flops_per_token(model), plan.peak_flops(cfg, ctx.device)
    log(f"model: {model.num_parameters() / 1e6:.2f}M parameters ({cfg.quant}), {type(cfg).__name__}, device "
        f"{ctx.device}, {'bf16 autocast' if isinstance(run.amp, torch.autocast) else 'fp32'}, "
        f"{torch.get_num_threads()} threads" + (f", {ctx.world_size} processes" if ctx.world_size > 1 else "")
        + (f", {cfg.grad_accum_steps} micro-batches per step" if cfg.grad_accum_steps > 1 else ""))
    if parts(cfg):
        log("plugged in: " + "; ".join(f"{part} {shown(spec)}" for part, spec in parts(cfg).items())
            + (f" (this is the fp twin: {twin_kind(model)})" if cfg.quant == "none" else "")
            + f"; optimizer {type(run.opt).__name__}")
    model.train()
    return run


def train_step(run: Run) -> tuple[float, float, float]:
    """One optimizer step over the global batch's micro-batches; returns (lr, loss, grad norm)."""
    cfg, ctx, dev = run.cfg, run.ctx, run.ctx.device
    lr, wd = lr_and_wd(cfg, run.step)
    apply_schedule(run.opt, cfg, lr, wd)
    run.opt.zero_grad(set_to_none=True)
    micro = distributed.micro_batches(run.task, run.step, cfg, ctx)
    loss_sum = torch.zeros((), device=dev)
    for i, (x, y, share) in enumerate(micro):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with distributed.grad_sync(run.ddp_model, sync=i == len(micro) - 1):
            with run.amp:
                loss = forward_loss(run, x, y)
            (loss * (share * ctx.world_size)).backward()  # DDP averages over processes: undo its 1/world_size
        loss_sum += loss.detach() * share
    loss_val = distributed.sum_over_ranks(loss_sum, ctx).item()  # the global batch's mean loss
    if not math.isfinite(loss_val):
        raise non_finite(run, "loss", loss_val)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip))
    if not math.isfinite(grad_norm):  # stepping would write NaNs into the weights (and the next checkpoint)
        raise non_finite(run, "gradient norm", grad_norm)
    run.opt.step()
    run.step += 1
    run.tokens += x.numel() * len(micro) * ctx.world_size  # all processes'
    run.first_loss = loss_val if run.first_loss is None else run.first_loss
    run.loss_ema = loss_val if run.loss_ema is None else 0.9 * run.loss_ema + 0.1 * loss_val
    return lr, loss_val, grad_norm


def forward_loss(run: Run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    try:
        return run.train_model(x, y)[1]
    except Exception as e:  # noqa: BLE001 - torch.compile needs a C++ compiler on CPU; go eager
        if run.train_model is run.ddp_model:
            raise
        run.log(f"torch.compile failed ({type(e).__name__}); training without it")
        run.train_model = run.ddp_model
        return run.ddp_model(x, y)[1]


def non_finite(run: Run, what: str, value: float) -> NonFiniteLoss:
    """The error that stops training before an update that would write NaN/Inf into the weights."""
    run.record({"kind": "error", "step": run.step, "error": f"non-finite {what}"})
    cfg, path = run.cfg, run.ckpt_path
    kept = f"last good checkpoint kept: {path}" if os.path.exists(path) else "no checkpoint yet"
    causes = f"learning_rate too high (now {cfg.learning_rate:g}; try --set learning_rate={cfg.learning_rate / 2:g})"
    causes += " or bf16 overflow (try --set dtype=fp32)" if isinstance(run.amp, torch.autocast) else " or bad data"
    return NonFiniteLoss(f"{what} became {value} at step {run.step}; stopped before the update ({kept}). "
                         f"Likely cause: {causes}")


def log_progress(run: Run, lr: float, loss: float, grad_norm: float):
    """metrics.jsonl every 10 steps (and at the last), and the progress bar."""
    if run.step % 10 == 0 or run.step == run.cfg.max_steps:
        tps = run.tokens / max(1e-9, time.time() - run.t0)
        mfu = plan.mfu(tps, run.flops_per_token, run.peak_flops, run.ctx.world_size)
        run.record({"kind": "train", "step": run.step, "train_loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": tps, "mfu": mfu, "elapsed_s": time.time() - run.t0})
        run.bar.set_postfix(loss=f"{run.loss_ema:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}",
                            mfu="n/a" if mfu is None else f"{mfu:.1%}", refresh=False)
    run.bar.update(1)


def replan(run: Run):
    """With a time budget: set max_steps from the measured speed (TimeBudget says when)."""
    if run.budget.done:
        return
    planned_cfg = run.budget.after_step(run.cfg, run.step, run.start_step, run.ctx)
    if planned_cfg is not run.cfg:
        if not run.planned or abs(planned_cfg.max_steps - run.cfg.max_steps) >= 0.01 * run.cfg.max_steps:
            run.log(f"time budget {run.budget.budget:.0f} s: {planned_cfg.max_steps} steps at the measured speed")
        run.cfg, run.planned = planned_cfg, True
        run.bar.total = run.cfg.max_steps


def after_step(run: Run) -> bool:
    """Evaluate and checkpoint when due, save on a signal; True when training should stop here."""
    cfg, step = run.cfg, run.step
    out_of_time = run.budget.over(run.ctx)
    if step % cfg.eval_interval == 0 or step >= cfg.max_steps or out_of_time:
        m = evaluate(run)
        save(run)
        if run.solved is not None and run.solved(m):
            left = cfg.max_steps - step
            if 0 < left < cfg.eval_interval and not out_of_time:
                # Stopping here saves less than one interval and skips the end of the annealing,
                # where a held-out half was once missed by one problem (RESULTS.md, issue 9, sixth pass).
                run.log(f"solved at step {step}; finishing the schedule's last {left} steps")
            else:
                why = "the time budget is spent; stopping" if out_of_time and left > 0 else "stopping"
                run.log(f"solved at step {step}: every validation score >= {run.task.solve_target:.1%}; {why}")
                return True
        if out_of_time:
            run.log(f"time budget {run.budget.budget:.0f} s spent at step {step}; stopping")
            return True
    elif distributed.all_agree(time.time() - run.saved_time >= cfg.checkpoint_interval_s, run.ctx):
        save(run)
    if run.watch is not None and distributed.all_agree(bool(reason := run.watch(run)), run.ctx):
        run.log(f"stopping early at step {step}: {reason}")
        run.record({"kind": "stop_early", "step": step, "reason": reason, "pid": os.getpid()})  # a twin's parent stops the other now
        if run.history[-1]["step"] != step:
            evaluate(run)  # the diagnosis reads the state the run stopped in
        if run.saved_step != step:
            save(run)
        run.stopped_early = reason or "another process's watch"
        return True
    if distributed.all_agree(stop_requested() is not None, run.ctx):  # SIGTERM/SIGINT: save, then stop
        if run.saved_step != step:
            save(run)
        raise Interrupted(stop_requested() or signal.SIGTERM, step, run.ckpt_path)
    return False


def evaluate(run: Run) -> dict:
    """The task's evaluation, the on_eval hook's metrics and the training signals, logged and kept."""
    started, model = time.time(), run.model
    model.eval()
    with run.amp:
        m = run.task.evaluate(model, run.ctx.device, run.step)
    model.train()
    samples = m.pop("samples", [])
    run.log(f"step {run.step}: {run.task.format_eval(m)}")
    for line in samples:
        run.log(f"    {line}")
    if run.on_eval is not None:
        model.eval()
        m.update(run.on_eval(model, run.step))
        model.train()
    m.update(run.signals(model, run.step, run.first_loss, run.loss_ema))  # what the pipeline detectors read
    m = {"step": run.step, **m}
    run.history.append(m)
    run.record({"kind": "eval", **m})
    run.budget.note_eval(time.time() - started)  # what the time budget counts an evaluation as
    return m


def save(run: Run):
    """Checkpoint the run. A collective under torchrun: every process comes here, rank 0 writes."""
    task_state = distributed.gather_task_state(run.task, run.ctx)
    if run.ctx.is_main:
        contents = checkpoint_contents(run.model, run.opt, run.step, run.cfg, run.task, run.history,
                                       {"first_loss": run.first_loss, "loss_ema": run.loss_ema,
                                        "planned_max_steps": run.cfg.max_steps if run.planned else 0,
                                        "param_fingerprints": run.signals.start}, run.on_eval)
        contents["task_state"] = task_state
        try:
            save_checkpoint(contents, run.ckpt_path, run.keep_previous)
        except TrainingError:
            forget_metrics_after(run.metrics_path, run.saved_step)  # the log stays in step with the checkpoint
            raise
        run.keep_previous = True
    run.saved_step, run.saved_time = run.step, time.time()  # every process keeps the same save clock


def finish(run: Run) -> dict:
    final, elapsed = run.history[-1], time.time() - run.t0
    return {"final": final, "history": run.history, "first_train_loss": run.first_loss,
            "last_train_loss": run.loss_ema, "max_steps": run.cfg.max_steps,
            "solved": bool(run.solved and run.solved(final)), "elapsed_s": elapsed, "stopped_early": run.stopped_early,
            "tokens_per_s": run.tokens / max(1e-9, elapsed), "n_params": run.model.num_parameters(),
            "out_dir": run.out_dir, "model": run.model, "optimizer": run.opt}
