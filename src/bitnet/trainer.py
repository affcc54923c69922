"""The one training loop, shared by every experiment.

An experiment hands over a *task* object with:
  identity() -> dict                    what the checkpoint must remember (tokenizer, task name)
  get_batch(step, batch_size) -> x, y   y = next tokens, -100 where no loss is taken; a pure
                                        function of (seed, step), so a resumed run sees the same data
  evaluate(model, device, step) -> dict metrics; the key "samples" holds printable lines
  format_eval(metrics) -> str           one line for the log
Everything else (schedule, AdamW, clipping, autocast, evaluation cadence, metrics.jsonl,
atomic checkpoints, resume, NaN stop) lives here.
"""
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from . import distributed, plan
from .config_tiny import BitNetConfig
from .model import BitNetForCausalLM

CKPT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"


class TrainingError(RuntimeError):
    """A problem the user must act on; the CLI prints its one-line message and exits."""


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise TrainingError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast where the hardware runs it fast (CUDA with bf16, CPUs with AVX-512 bf16/AMX)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "auto":
        if device.type == "cuda":
            ok = torch.cuda.is_bf16_supported()
        else:
            ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        if not ok:
            return contextlib.nullcontext()
    elif dtype != "bf16":
        raise TrainingError(f"dtype must be auto, bf16 or fp32, got {dtype!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lr_and_wd(cfg: BitNetConfig, step: int) -> tuple[float, float]:
    """Learning rate and weight decay at `step` (0-based).

    cosine:    linear warmup, then cosine from learning_rate down to learning_rate*min_lr_ratio.
    two_stage: BitNet b1.58's recipe: warmup, a high constant-ish rate for stage one (linear decay
               to half), then a drop to two_stage_lr_ratio of it with cosine decay and weight
               decay switched off for stage two.
    """
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps, cfg.weight_decay
    if cfg.schedule == "cosine":
        t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
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


def make_optimizer(model: torch.nn.Module, cfg: BitNetConfig, device: torch.device) -> torch.optim.AdamW:
    # Weight decay on matrices (latent BitLinear weights, embeddings, head), not on norm gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "decay": True},
              {"params": no_decay, "weight_decay": 0.0, "decay": False}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure remove it.
    A crash or a full disk never leaves half a file where a good one was."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path: str):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_lines_atomic(path: str, lines: list[str]):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(lines)


def write_json_atomic(path: str, obj, default=float):
    """JSON with indent 2; `default` converts what json cannot (numpy floats by default)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=default)


def load_checkpoint(path: str) -> dict:
    """Load OUT_DIR/ckpt.pt (or a path to the file itself) with a one-line error when it is not one."""
    if os.path.isdir(path):
        path = os.path.join(path, CKPT_NAME)
    if not os.path.exists(path):
        raise TrainingError(f"no checkpoint at {path}; pass the run's --out-dir (it holds {CKPT_NAME})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise TrainingError(f"{path} is not a readable checkpoint ({type(e).__name__}); was the run interrupted while saving?") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise TrainingError(f"{path} is not a bitnet-tiny checkpoint (no 'model'/'config' entries)")
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu") -> BitNetForCausalLM:
    from . import config_tiny
    cls = getattr(config_tiny, ckpt.get("config_class", "BitNetConfig"), config_tiny.BitNetConfig)
    cfg = cls(**ckpt["config"])
    model = BitNetForCausalLM(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def evaluate_and_log(model, task, device, step, cfg, log_fn, amp) -> dict:
    model.eval()
    with amp:
        metrics = task.evaluate(model, device, step)
    model.train()
    samples = metrics.pop("samples", [])
    log_fn(f"step {step}: {task.format_eval(metrics)}")
    for line in samples:
        log_fn(f"    {line}")
    return metrics


def train(cfg: BitNetConfig, task, out_dir: str, device: str = "auto", resume: bool = False,
          on_eval=None, quiet: bool = False) -> dict:
    """Train a model on `task` and return a summary. `on_eval(model, step) -> dict` adds metrics."""
    ctx = distributed.setup(pick_device(device))  # one process, or this one's place in a torchrun job
    dev = ctx.device
    distributed.micro_batch_rows(cfg, ctx.world_size)  # a global batch that does not split: say so before any work
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, CKPT_NAME)
    metrics_path = os.path.join(out_dir, METRICS_NAME)
    quiet = quiet or not ctx.is_main  # only rank 0 logs
    log = (lambda s: None) if quiet else (lambda s: tqdm.write(s, file=sys.stdout))

    torch.manual_seed(cfg.seed)
    model = BitNetForCausalLM(cfg).to(dev)
    opt = make_optimizer(model, cfg, dev)
    step, history = 0, []
    if resume:
        if not os.path.exists(ckpt_path):
            raise TrainingError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
        ckpt = load_checkpoint(ckpt_path)
        saved_task, task_now = ckpt.get("task") or {}, task.identity()
        if saved_task != task_now:
            diff = sorted(k for k in set(saved_task) | set(task_now) if saved_task.get(k) != task_now.get(k))
            raise TrainingError(f"--resume: {ckpt_path} was trained with a different task/tokenizer (differs in {diff}); "
                                f"use a new --out-dir or the original data and tokenizer")
        saved = dict(ckpt["config"])
        for k in ("max_steps", "eval_interval", "grad_accum_steps", "peak_tflops"):  # the only fields a resume may change
            saved[k] = getattr(cfg, k)
        if saved != asdict(cfg):
            diff = sorted(k for k in saved if saved[k] != asdict(cfg).get(k))
            raise TrainingError(f"--resume: the config differs from the checkpoint's in {diff}; drop those overrides")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_state"])
        step, history = ckpt["step"], ckpt.get("history", [])
        distributed.restore_task_state(task, ckpt.get("task_state"), ctx)
        if ctx.is_main and os.path.exists(metrics_path):  # forget what was logged after the checkpoint
            with open(metrics_path) as f:
                keep = [ln for ln in f if json.loads(ln).get("step", 0) <= step]
            write_lines_atomic(metrics_path, keep)
        log(f"resumed from {ckpt_path} at step {step}")
    elif ctx.is_main and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log

    amp = autocast_for(dev, cfg.dtype)
    # The compiled module shares the model's parameters; evaluation and generation use the plain
    # model, whose shapes vary (compiling those would recompile again and again).
    ddp_model = distributed.wrap(model, ctx)  # the model itself for one process
    train_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    n_params = model.num_parameters()
    flops_per_token, peak_flops = plan.flops_per_token(model), plan.peak_flops(cfg, dev)
    log(f"model: {n_params / 1e6:.2f}M parameters ({cfg.quant}), {type(cfg).__name__}, device {dev}, "
        f"{'bf16 autocast' if isinstance(amp, torch.autocast) else 'fp32'}, {torch.get_num_threads()} threads"
        + (f", {ctx.world_size} processes" if ctx.world_size > 1 else "")
        + (f", {cfg.grad_accum_steps} micro-batches per step" if cfg.grad_accum_steps > 1 else ""))

    def record(entry: dict):
        if not ctx.is_main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def checkpoint():
        task_state = distributed.gather_task_state(task, ctx)  # a collective: every process comes here
        if not ctx.is_main:
            return
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "config": asdict(cfg), "config_class": type(cfg).__name__, "task": task.identity(),
                     "rng_state": torch.get_rng_state(), "history": history, "task_state": task_state}, ckpt_path)

    def run_eval():
        m = evaluate_and_log(model, task, dev, step, cfg, log, amp)
        if on_eval is not None:
            model.eval()
            m.update(on_eval(model, step))
            model.train()
        m = {"step": step, **m}
        history.append(m)
        record({"kind": "eval", **m})
        return m

    model.train()
    if step == 0:
        run_eval()  # the loss at step 0 should sit near ln(vocab_size)
    t0, tokens, first_loss, loss_ema = time.time(), 0, None, None
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {cfg.quant}", disable=quiet,
               dynamic_ncols=True, file=sys.stderr, mininterval=2.0)
    while step < cfg.max_steps:
        lr, wd = lr_and_wd(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group["decay"] else 0.0
        opt.zero_grad(set_to_none=True)
        micro = distributed.micro_batches(task, step, cfg, ctx)
        loss_sum = torch.zeros((), device=dev)
        for i, (x, y, share) in enumerate(micro):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with distributed.grad_sync(ddp_model, sync=i == len(micro) - 1):
                with amp:
                    try:
                        _, loss = train_model(x, y)
                    except Exception as e:  # noqa: BLE001 - torch.compile needs a C++ compiler on CPU; without one, go eager
                        if train_model is ddp_model:
                            raise
                        log(f"torch.compile failed ({type(e).__name__}); training without it")
                        train_model = ddp_model
                        _, loss = ddp_model(x, y)
                (loss * (share * ctx.world_size)).backward()  # DDP averages over processes: undo its 1/world_size
            loss_sum += loss.detach() * share
        loss_val = distributed.sum_over_ranks(loss_sum, ctx).item()  # the global batch's mean loss
        if not math.isfinite(loss_val):
            bar.close()
            record({"kind": "error", "step": step, "error": "non-finite loss"})
            raise TrainingError(
                f"loss became {loss_val} at step {step}; stopped ("
                + (f"last good checkpoint kept in {out_dir}" if os.path.exists(ckpt_path) else "no checkpoint yet")
                + "). "
                f"Lower learning_rate (now {cfg.learning_rate:g}) or check the data")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        step += 1
        tokens += x.numel() * len(micro) * ctx.world_size  # all processes'
        first_loss = loss_val if first_loss is None else first_loss
        loss_ema = loss_val if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_val
        if step % 10 == 0 or step == cfg.max_steps:
            tps = tokens / max(1e-9, time.time() - t0)
            mfu = plan.mfu(tps, flops_per_token, peak_flops, ctx.world_size)
            record({"kind": "train", "step": step, "train_loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": tps, "mfu": mfu, "elapsed_s": time.time() - t0})
            bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}",
                            mfu="n/a" if mfu is None else f"{mfu:.1%}", refresh=False)
        bar.update(1)
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            run_eval()
            checkpoint()
    bar.close()
    final = history[-1]
    elapsed = time.time() - t0
    return {"final": final, "history": history, "first_train_loss": first_loss, "last_train_loss": loss_ema,
            "elapsed_s": elapsed, "tokens_per_s": tokens / max(1e-9, elapsed), "n_params": n_params,
            "out_dir": out_dir, "model": model}
