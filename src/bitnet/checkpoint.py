"""The checkpoint: what it holds, how it is written and read, and how a run resumes from it.

A checkpoint holds only tensors and plain Python data (dicts, lists, str, numbers), so it loads
with torch.load(weights_only=True): a file from a stranger cannot run code when it is opened.
It holds enough to continue bit for bit: weights, optimizer moments, the step (which fixes the
schedule and the data position), every RNG state, the loss averages and the hooks' state."""
import json
import os
import pickle
import random
import shutil
import warnings
from dataclasses import asdict

import numpy as np
import torch

from . import config_tiny, distributed
from .build import build_model
from .errors import TrainingError, first_line
from .rundir import CKPT_NAME, atomic_path, forget_metrics_after, fsync_dir, previous_checkpoint, raise_if_disk_full

PLUG_DEFAULTS = {"linear_spec": "", "model_spec": "", "optimizer_spec": "", "spec_paths": ""}
RESUME_MAY_CHANGE = ("max_steps", "eval_interval", "checkpoint_interval_s", "time_budget_s", "grad_accum_steps",
                     "peak_tflops")  # the only fields a resume may change


def save_checkpoint(obj: dict, path: str, keep_previous: bool = True):
    """Write `obj` to `path` so that a kill or a full disk at any moment leaves a loadable file:
    a temporary file, fsync'd, then renamed over `path`. With `keep_previous` the checkpoint it
    replaces stays as ckpt.prev.pt (a hard link made first, so `path` itself never goes missing).
    A full or failing disk is DiskFull (exit 4), another OSError (permissions) a one-line
    TrainingError; either way the old files are intact and the temporary file is gone."""
    kept = (f"{path} still holds the last good checkpoint" if os.path.exists(path) else "no checkpoint was written yet")
    then = f"{kept}: free some space, then continue with --resume"
    try:
        with atomic_path(path, "the checkpoint", _tensor_bytes(obj), then) as tmp:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            if keep_previous and os.path.exists(path):
                with atomic_path(previous_checkpoint(path), "the previous checkpoint", then=then) as prev_tmp:
                    try:
                        os.link(path, prev_tmp)
                    except OSError:  # a filesystem without hard links
                        shutil.copyfile(path, prev_tmp)
        fsync_dir(os.path.dirname(path) or ".")
    except OSError as e:
        raise_if_disk_full(e, "the checkpoint", path, then=then)
        raise TrainingError(f"could not write checkpoint {path} ({e.strerror or e}); fix the folder's permissions, "
                            f"then continue with --resume (the previous checkpoint is intact)") from None


def _tensor_bytes(obj) -> int:
    """The bytes of the tensors in a nested dict/list: about the size of its checkpoint."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return len(obj) if isinstance(obj, (str, bytes)) else 0


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


def config_from_checkpoint(ckpt: dict):
    cls = getattr(config_tiny, ckpt.get("config_class", "BitNetConfig"), config_tiny.BitNetConfig)
    return cls(**ckpt["config"])


def model_from_checkpoint(ckpt: dict, device="cpu") -> torch.nn.Module:
    cls_name = ckpt.get("config_class", "BitNetConfig")
    cfg = None
    try:
        cfg = config_from_checkpoint(ckpt)
        model = build_model(cfg)
        model.load_state_dict(ckpt["model"])
    except TrainingError as e:  # the user's model (--model/--linear) did not rebuild here: say which
        raise TrainingError(f"the checkpoint's model did not rebuild: {e} (a plugged-in run needs its code "
                            f"where it was, or its --path folders: {cfg.spec_paths or 'none'})") from None
    except (TypeError, ValueError, RuntimeError) as e:  # a config from another version, or weights of another shape
        raise TrainingError(f"the checkpoint's weights do not fit its config {cls_name} ({first_line(e)}); "
                            f"it was written by another version or edited; retrain or use the matching version") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------- RNG
def seed_everything(seed: int):
    """torch (CPU and CUDA), Python's random and numpy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


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


# ----------------------------------------------------------------------------- save and resume a run
def checkpoint_contents(model, opt, step: int, cfg, task, history: list, train_state: dict, on_eval=None) -> dict:
    """What a checkpoint holds: enough to continue bit for bit and to rebuild the model and tokenizer
    for inference. No grad scaler: bf16 autocast needs none, and fp16 is not offered."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "config": asdict(cfg), "config_class": type(cfg).__name__, "optimizer_class": type(opt).__name__,
            "task": task.identity(),
            "history": json.dumps(history, default=float), "train_state": dict(train_state),
            "on_eval": on_eval.state_dict() if hasattr(on_eval, "state_dict") else None, **rng_states()}


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
