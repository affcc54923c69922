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
import fcntl
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed, plan
from .config_tiny import BitNetConfig
from .model import BitNetForCausalLM

CKPT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"


class TrainingError(RuntimeError):
    """A problem the user must act on; the CLI prints its one-line message and exits with `exit_code`."""
    exit_code = 2


class NonFiniteLoss(TrainingError):
    """The loss or the gradient became NaN/Inf: stopped before the update, exit code 3."""
    exit_code = 3


def non_finite_error(what: str, value: float, step: int, cfg: BitNetConfig, bf16: bool, ckpt_path: str) -> NonFiniteLoss:
    kept = f"last good checkpoint kept: {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint yet"
    causes = f"learning_rate too high (now {cfg.learning_rate:g}; try --set learning_rate={cfg.learning_rate / 2:g})"
    causes += " or bf16 overflow (try --set dtype=fp32)" if bf16 else " or bad data"
    return NonFiniteLoss(f"{what} became {value} at step {step}; stopped before the update ({kept}). "
                         f"Likely cause: {causes}")


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


def make_optimizer(model: torch.nn.Module, cfg: BitNetConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer_spec:  # --optimizer: the user's factory (bitnet.plugged), on their own module
        from .plugged import make_user_optimizer
        return make_user_optimizer(model, cfg)
    if cfg.inject_bug:  # the self-test's optimizer bugs (diagnose/bugs.py); None for every other bug
        from .diagnose.bugs import buggy_optimizer
        if (opt := buggy_optimizer(model, cfg, device)) is not None:
            return opt
    # Weight decay on matrices (latent BitLinear weights, embeddings, head), not on norm gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "decay": True},
              {"params": no_decay, "weight_decay": 0.0, "decay": False}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


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


def write_lines_atomic(path: str, lines: list[str]):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(lines)


def write_json_atomic(path: str, obj, default=float):
    """JSON with indent 2; `default` converts what json cannot (numpy floats by default)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=default)


# ----------------------------------------------------------------------------- checkpoints
# A checkpoint holds only tensors and plain Python data (dicts, lists, str, numbers), so it loads
# with torch.load(weights_only=True): a file from a stranger cannot run code when it is opened.
PREV_CKPT_NAME = "ckpt.prev.pt"
# Test-only: seconds to sleep inside the writer after the new file is written and before it is
# renamed into place, so bench/chaos.py can aim kill -9s at a checkpoint write. Never set it otherwise.
SAVE_DELAY_ENV = "BITNET_TEST_SAVE_DELAY_S"


def previous_checkpoint(path: str) -> str:
    """OUT_DIR/ckpt.prev.pt beside OUT_DIR/ckpt.pt: the good checkpoint before the latest one."""
    return os.path.join(os.path.dirname(path), PREV_CKPT_NAME)


def save_checkpoint(obj: dict, path: str, keep_previous: bool = True):
    """Write `obj` to `path` so that a kill or a full disk at any moment leaves a loadable file:
    a temporary file, fsync'd, then renamed over `path`. With `keep_previous` the checkpoint it
    replaces stays as ckpt.prev.pt (a hard link made first, so `path` itself never goes missing).
    An OSError (disk full, permissions) becomes a one-line TrainingError; the old files are intact."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            if keep_previous and os.path.exists(path):
                with atomic_path(previous_checkpoint(path)) as prev_tmp:
                    try:
                        os.link(path, prev_tmp)
                    except OSError:  # a filesystem without hard links
                        shutil.copyfile(path, prev_tmp)
            delay = float(os.environ.get(SAVE_DELAY_ENV) or 0)
            if delay > 0:
                time.sleep(delay)
        _fsync_dir(os.path.dirname(path) or ".")
    except OSError as e:
        raise TrainingError(f"could not write checkpoint {path} ({e.strerror or e}); free disk space or fix the "
                            f"folder's permissions, then continue with --resume (the previous checkpoint is intact)") from None


def _fsync_dir(folder: str):
    """Make a rename in `folder` durable (a power cut after it would otherwise undo it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_states() -> dict:
    """Every random generator training may draw from (dropout uses torch's), as tensors and JSON text."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"rng_state": torch.get_rng_state(),
              "rng_state_python": json.dumps([version, list(state), gauss]),
              "rng_state_numpy": json.dumps([name, keys.tolist(), int(pos), int(has_gauss), float(cached)])}
    if torch.cuda.is_available():
        states["rng_state_cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(ckpt: dict):
    torch.set_rng_state(ckpt["rng_state"])
    if "rng_state_python" in ckpt:
        version, state, gauss = json.loads(ckpt["rng_state_python"])
        random.setstate((version, tuple(state), gauss))
    if "rng_state_numpy" in ckpt:
        name, keys, pos, has_gauss, cached = json.loads(ckpt["rng_state_numpy"])
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "rng_state_cuda" in ckpt and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng_state_cuda"])


def load_checkpoint(path: str) -> dict:
    """Load OUT_DIR/ckpt.pt (or a path to the file itself) with a one-line error when it is not one.
    Only tensors and plain data are unpickled (weights_only=True): a crafted file is refused, never run."""
    if os.path.isdir(path):
        path = os.path.join(path, CKPT_NAME)
    if not os.path.exists(path):
        raise TrainingError(f"no checkpoint at {path}; pass the run's --out-dir (it holds {CKPT_NAME})")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on foreign files
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused something: code (a GLOBAL) or garbage
        raise TrainingError(f"{path} was not loaded: weights_only refused it ({_refusal_reason(e)}); it holds "
                            f"objects other than tensors and plain data, whose unpickling could run code, or it "
                            f"is damaged; use a checkpoint written by bitnet-tiny{_previous_hint(path)}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise TrainingError(f"{path} is not a readable checkpoint ({type(e).__name__}); was the run interrupted "
                            f"while saving?{_previous_hint(path)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise TrainingError(f"{path} is not a bitnet-tiny checkpoint (no 'model'/'config' entries)")
    if isinstance(ckpt.get("history"), str):  # stored as JSON text: metrics may hold numpy floats
        ckpt["history"] = json.loads(ckpt["history"])
    return ckpt


def _refusal_reason(e: Exception) -> str:
    """The one informative line of torch's long weights_only message, e.g. 'unsupported GLOBAL posix.system'."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if ln.startswith(("Trying to load", "Unsupported", "Weights only load failed:"))]
    return (useful[-1] if useful else lines[-1] if lines else type(e).__name__)[:160].rstrip(".")


def _previous_hint(path: str) -> str:
    """Name OUT_DIR/ckpt.prev.pt when `path` is OUT_DIR/ckpt.pt and the previous one loads."""
    prev = previous_checkpoint(path)
    if os.path.basename(path) != CKPT_NAME or not os.path.exists(prev):
        return ""
    try:
        load_checkpoint(prev)
    except TrainingError:
        return f" The previous checkpoint {prev} is unreadable too"
    return (f" The previous good checkpoint is {prev}: continue from it with --resume-from-previous, "
            f"or pass it to --checkpoint")


def checkpoint_contents(model, opt, step: int, cfg, task, history: list, train_state: dict, on_eval=None) -> dict:
    """What a checkpoint holds: enough to continue bit for bit (weights, AdamW moments, step, which
    fixes the schedule and the data position, every RNG state, the loss averages, the on_eval hook's
    state) and to rebuild the model and tokenizer for inference. No grad scaler: bf16 autocast needs
    none, and fp16 is not offered."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "config": asdict(cfg), "config_class": type(cfg).__name__, "optimizer_class": type(opt).__name__,
            "task": task.identity(),
            "history": json.dumps(history, default=float), "train_state": dict(train_state),
            "on_eval": on_eval.state_dict() if hasattr(on_eval, "state_dict") else None, **rng_states()}


def seed_everything(seed: int):
    """torch (CPU and CUDA), Python's random and numpy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ----------------------------------------------------------------------------- one writer per OUT_DIR
LOCK_NAME = "run.lock"


@contextlib.contextmanager
def out_dir_lock(out_dir: str):
    """Hold OUT_DIR/run.lock (it holds the PID) while a run writes OUT_DIR; a second run refuses to start.
    The lock is an flock, which the kernel drops when its process dies, so a lock left behind by
    a killed run is simply taken over. Leftover temporary files of dead runs are removed."""
    lock_path = os.path.join(out_dir, LOCK_NAME)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = _take_lock(lock_path)
    except OSError as e:
        raise TrainingError(f"cannot write to --out-dir {out_dir} ({e.strerror or e}); "
                            f"choose a folder you can write to") from None
    if fd is None:
        try:
            with open(lock_path) as f:
                holder = f.read().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise TrainingError(f"{out_dir} is in use by another run (pid {holder}, lock {lock_path}); "
                            f"wait for it to finish, stop it, or use another --out-dir")
    try:
        _remove_stale_temp_files(out_dir)
        yield
    finally:
        os.remove(lock_path)  # before releasing the flock, so no one locks a file about to vanish
        os.close(fd)


def _take_lock(lock_path: str) -> int | None:
    """An fd holding the flock on `lock_path` with our PID written in it, or None if a live process holds it."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # the holder we waited on may have removed the file: then lock the new one instead
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _remove_stale_temp_files(out_dir: str):
    """atomic_path's NAME.tmp.PID files whose writer is gone (a kill mid-save); we are the only writer now."""
    for name in os.listdir(out_dir):
        stem, sep, pid = name.rpartition(".tmp.")
        path = os.path.join(out_dir, name)
        if sep and stem and pid.isdigit() and os.path.isfile(path) and not _process_alive(int(pid)):
            os.remove(path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ----------------------------------------------------------------------------- SIGTERM / SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_stop_signal: list[int] = []  # the signal received while stop_on_signals() is active, if any


@contextlib.contextmanager
def stop_on_signals():
    """Inside: SIGTERM and SIGINT ask train() to save a checkpoint after the current step and
    raise Interrupted (exit 143 / 130). Outside, both keep their usual effect."""
    def ask(signum, frame):
        if not _stop_signal:
            _stop_signal.append(signum)
            try:  # stderr may be a pipe whose reader is gone: that must not stop the save
                print(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping",
                      file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass

    if threading.current_thread() is not threading.main_thread():  # handlers can only live there
        yield
        return
    old = {s: signal.signal(s, ask) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _stop_signal.clear()


class Interrupted(TrainingError):
    """SIGTERM or SIGINT: the checkpoint is saved; exit 128 + the signal's number, as a shell would."""

    def __init__(self, signum: int, step: int, ckpt_path: str):
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {ckpt_path}; "
                         f"continue with --resume")


def find_runs(path: str) -> tuple[str, str | None, str]:
    """(ternary run, twin run or None, folder for verdict.json and PNGs).

    `path` is a run folder or its ckpt.pt. The twin layout OUT/ternary + OUT/fp is recognised
    from OUT or from OUT/ternary; anything else is a single run reported into its own folder."""
    run_dir = path.rstrip("/") if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.isdir(os.path.join(run_dir, "ternary")):
        root, ternary = run_dir, os.path.join(run_dir, "ternary")
    elif os.path.basename(run_dir) == "ternary":
        root, ternary = os.path.dirname(run_dir) or ".", path
    else:
        return path, None, run_dir
    twin = os.path.join(root, "fp")
    return ternary, (twin if os.path.isdir(twin) else None), root


def build_model(cfg: BitNetConfig) -> torch.nn.Module:
    """The model for `cfg`; with cfg.inject_bug (the self-test) the diagnosis package swaps the bug in.
    With cfg.linear_spec / cfg.model_spec, the user's layer or model (bitnet.plugged)."""
    if cfg.linear_spec or cfg.model_spec:
        from .plugged import PluggedError, build_user_model
        try:
            return build_user_model(cfg)
        except PluggedError as e:
            raise TrainingError(str(e)) from None
    model = BitNetForCausalLM(cfg)
    if cfg.inject_bug:
        from .diagnose.bugs import inject
        inject(model, cfg.inject_bug)
    return model


def model_from_checkpoint(ckpt: dict, device="cpu") -> BitNetForCausalLM:
    from . import config_tiny
    cls = getattr(config_tiny, ckpt.get("config_class", "BitNetConfig"), config_tiny.BitNetConfig)
    try:
        cfg = cls(**ckpt["config"])
        model = build_model(cfg)
        model.load_state_dict(ckpt["model"])
    except TrainingError as e:  # the user's model (--model/--linear) did not rebuild here: say which
        raise TrainingError(f"the checkpoint's model did not rebuild: {e} (a plugged-in run needs its code "
                            f"where it was, or its --path folders: {cfg.spec_paths or 'none'})") from None
    except (TypeError, ValueError, RuntimeError) as e:  # a config from another version, or weights of another shape
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(f"the checkpoint's weights do not fit its config {cls.__name__} ({first[:200]}); "
                            f"it was written by another version or edited; retrain or use the matching version") from None
    return model.to(device).eval()


def forget_metrics_after(metrics_path: str, step: int):
    """Drop metrics.jsonl lines logged after `step` (the checkpoint's), so the log matches it."""
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            keep = [ln for ln in f if json.loads(ln).get("step", 0) <= step]
        write_lines_atomic(metrics_path, keep)


def restore_run(ckpt_path: str, cfg, task, model, opt, metrics_path: str, on_eval=None,
                ctx=None) -> tuple[int, list, dict]:
    """Load a checkpoint into `model` and `opt` for --resume, after checking it belongs to this run
    (same task, tokenizer and config), and restore every RNG state. Returns (step, history, train_state)."""
    if not os.path.exists(ckpt_path):
        prev = previous_checkpoint(ckpt_path)
        also = (f" ({prev} exists: continue from it with --resume-from-previous)"
                if os.path.basename(ckpt_path) == CKPT_NAME and os.path.exists(prev) else "")
        raise TrainingError(f"--resume: no checkpoint at {ckpt_path}; start without --resume{also}")
    ckpt = load_checkpoint(ckpt_path)
    saved_task, task_now = ckpt.get("task") or {}, task.identity()
    if saved_task != task_now:
        diff = sorted(k for k in set(saved_task) | set(task_now) if saved_task.get(k) != task_now.get(k))
        raise TrainingError(f"--resume: {ckpt_path} was trained with a different task/tokenizer (differs in {diff}); "
                            f"use a new --out-dir or the original data and tokenizer")
    saved = {**PLUG_DEFAULTS, **ckpt["config"]}  # checkpoints from before --linear/--model/--optimizer
    for k in RESUME_MAY_CHANGE:
        saved[k] = getattr(cfg, k)
    if saved != asdict(cfg):
        diff = sorted(k for k in set(saved) | set(asdict(cfg)) if saved.get(k) != asdict(cfg).get(k))
        plugs = [k for k in diff if k in PLUG_DEFAULTS]
        if plugs:
            raise TrainingError(f"--resume: the checkpoint was trained with {', '.join(f'{k}={saved.get(k)!r}' for k in plugs)}; "
                                f"pass the same --linear/--model/--optimizer/--path as the original run")
        raise TrainingError(f"--resume: the config differs from the checkpoint's in {diff}; drop those overrides")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    restore_rng_states(ckpt)
    if ckpt.get("on_eval") is not None and hasattr(on_eval, "load_state_dict"):
        on_eval.load_state_dict(ckpt["on_eval"])
    step = ckpt["step"]
    if ctx is not None:
        distributed.restore_task_state(task, ckpt.get("task_state"), ctx)
    if ctx is None or ctx.is_main:
        forget_metrics_after(metrics_path, step)
    return step, ckpt.get("history", []), ckpt.get("train_state", {})


PLUG_DEFAULTS = {"linear_spec": "", "model_spec": "", "optimizer_spec": "", "spec_paths": ""}
RESUME_MAY_CHANGE = ("max_steps", "eval_interval", "checkpoint_interval_s", "time_budget_s", "grad_accum_steps",
                     "peak_tflops")  # the only fields a resume may change


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
        return all_agree(over, ctx) if self.budget and ctx is not None else over


def all_agree(flag: bool, ctx) -> bool:
    """`flag` on any process, for every process: a checkpoint or a stop is a collective under
    torchrun, so one process deciding alone (its own clock, its own signal) would hang the rest."""
    if ctx.world_size == 1:
        return flag
    return bool(distributed.max_over_ranks(torch.tensor(float(flag)), ctx))


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

    seed_everything(cfg.seed)
    model = build_model(cfg).to(dev)
    opt = make_optimizer(model, cfg, dev)
    step, history = 0, []
    train_state, keep_previous = {}, True
    if resume:  # True: OUT_DIR/ckpt.pt; a path: that checkpoint (e.g. ckpt.prev.pt when ckpt.pt is damaged)
        source = ckpt_path if resume is True else str(resume)
        step, history, train_state = restore_run(source, cfg, task, model, opt, metrics_path, on_eval, ctx)
        if train_state.get("planned_max_steps"):  # a time-budgeted run keeps the plan it made
            cfg = replace(cfg, max_steps=train_state["planned_max_steps"], time_budget_s=0.0)
        keep_previous = source == ckpt_path  # a damaged ckpt.pt must not become the new "previous good" one
        log(f"resumed from {source} at step {step}")
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
    if cfg.linear_spec or cfg.model_spec or cfg.optimizer_spec:
        from .plugged import parts, shown, twin_kind
        log("plugged in: " + "; ".join(f"{part} {shown(spec)}" for part, spec in parts(cfg).items())
            + (f" (this is the fp twin: {twin_kind(model)})" if cfg.quant == "none" else "")
            + f"; optimizer {type(opt).__name__}")

    def record(entry: dict):
        if not ctx.is_main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    saved = {"step": step, "time": time.time()}  # the latest checkpoint on disk

    def checkpoint():
        nonlocal keep_previous
        task_state = distributed.gather_task_state(task, ctx)  # a collective: every process comes here
        if not ctx.is_main:
            saved.update(step=step, time=time.time())  # keeps every process's save clock in step
            return
        contents = checkpoint_contents(model, opt, step, cfg, task, history,
                                       {"first_loss": first_loss, "loss_ema": loss_ema,
                                        "planned_max_steps": cfg.max_steps if planned else 0,
                                        "param_fingerprints": signals.start}, on_eval)
        contents["task_state"] = task_state
        try:
            save_checkpoint(contents, ckpt_path, keep_previous)
        except TrainingError:
            bar.close()
            forget_metrics_after(metrics_path, saved["step"])  # the log stays in step with the checkpoint
            raise
        saved.update(step=step, time=time.time())
        keep_previous = True

    def non_finite(what: str, value: float) -> NonFiniteLoss:
        bar.close()
        record({"kind": "error", "step": step, "error": f"non-finite {what}"})
        return non_finite_error(what, value, step, cfg, isinstance(amp, torch.autocast), ckpt_path)

    def run_eval():
        started = time.time()
        m = evaluate_and_log(model, task, dev, step, cfg, log, amp)
        if on_eval is not None:
            model.eval()
            m.update(on_eval(model, step))
            model.train()
        m.update(signals(model, step, first_loss, loss_ema))  # what the pipeline detectors read
        m = {"step": step, **m}
        history.append(m)
        record({"kind": "eval", **m})
        budget.note_eval(time.time() - started)  # what the time budget counts an evaluation as
        return m

    from .diagnose.health import TrainingSignals  # here: the diagnosis package imports this module
    signals = TrainingSignals(model, opt, train_state.get("param_fingerprints"))  # a resume judges from step 0 too
    first_loss, loss_ema = train_state.get("first_loss"), train_state.get("loss_ema")
    solved = getattr(task, "solved", None) if cfg.stop_when_solved else None
    budget, start_step, planned = TimeBudget(cfg, step), step, False
    model.train()
    if step == 0 and not history:
        run_eval()  # the loss at step 0 should sit near ln(vocab_size)
    t0, tokens = time.time(), 0
    saved["time"] = t0
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {cfg.quant}", disable=quiet,
               dynamic_ncols=True, file=sys.stderr, mininterval=2.0)
    while step < cfg.max_steps:
        lr, wd = lr_and_wd(cfg, step)
        apply_schedule(opt, cfg, lr, wd)
        opt.zero_grad(set_to_none=True)
        micro = distributed.micro_batches(task, step, cfg, ctx)
        loss_sum = torch.zeros((), device=dev)
        for i, (x, y, share) in enumerate(micro):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with distributed.grad_sync(ddp_model, sync=i == len(micro) - 1):
                with amp:
                    try:
                        _, loss = train_model(x, y)
                    except Exception as e:  # noqa: BLE001 - torch.compile needs a C++ compiler on CPU; go eager
                        if train_model is ddp_model:
                            raise
                        log(f"torch.compile failed ({type(e).__name__}); training without it")
                        train_model = ddp_model
                        _, loss = ddp_model(x, y)
                (loss * (share * ctx.world_size)).backward()  # DDP averages over processes: undo its 1/world_size
            loss_sum += loss.detach() * share
        loss_val = distributed.sum_over_ranks(loss_sum, ctx).item()  # the global batch's mean loss
        if not math.isfinite(loss_val):
            raise non_finite("loss", loss_val)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        if not math.isfinite(grad_norm):  # stepping would write NaNs into the weights (and the next checkpoint)
            raise non_finite("gradient norm", grad_norm)
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
        if not budget.done:
            planned_cfg = budget.after_step(cfg, step, start_step, ctx)
            if planned_cfg is not cfg:
                if not planned or abs(planned_cfg.max_steps - cfg.max_steps) >= 0.01 * cfg.max_steps:
                    log(f"time budget {budget.budget:.0f} s: {planned_cfg.max_steps} steps at the measured speed")
                cfg, planned = planned_cfg, True
                bar.total = cfg.max_steps
        out_of_time = budget.over(ctx)
        if step % cfg.eval_interval == 0 or step >= cfg.max_steps or out_of_time:
            m = run_eval()
            checkpoint()
            if solved is not None and solved(m):
                left = cfg.max_steps - step
                if 0 < left < cfg.eval_interval and not out_of_time:
                    # Stopping here saves less than one interval and skips the end of the annealing,
                    # where a held-out half was once missed by one problem (RESULTS.md, issue 9, sixth pass).
                    log(f"solved at step {step}; finishing the schedule's last {left} steps")
                else:
                    why = "the time budget is spent; stopping" if out_of_time and left > 0 else "stopping"
                    log(f"solved at step {step}: every validation score >= {task.solve_target:.1%}; {why}")
                    break
            if out_of_time:
                log(f"time budget {budget.budget:.0f} s spent at step {step}; stopping")
                break
        elif all_agree(time.time() - saved["time"] >= cfg.checkpoint_interval_s, ctx):
            checkpoint()
        if all_agree(bool(_stop_signal), ctx):  # SIGTERM/SIGINT under stop_on_signals(): save, then stop
            if saved["step"] != step:
                checkpoint()
            bar.close()
            raise Interrupted(_stop_signal[0] if _stop_signal else signal.SIGTERM, step, ckpt_path)
    bar.close()
    final = history[-1]
    elapsed = time.time() - t0
    return {"final": final, "history": history, "first_train_loss": first_loss, "last_train_loss": loss_ema,
            "max_steps": cfg.max_steps, "solved": bool(solved and solved(final)),
            "elapsed_s": elapsed, "tokens_per_s": tokens / max(1e-9, elapsed), "n_params": n_params,
            "out_dir": out_dir, "model": model, "optimizer": opt}
