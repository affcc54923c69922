"""What a run trains with: the device, autocast, the model and the optimizer.

This is the one place where our model, a plugged-in model (`--linear` / `--model` /
`--optimizer`, see plugged.py) and a self-test bug (`--inject-bug`, see bugs.py) are chosen.
bugs.py is imported only when a bug is asked for: the correct stack never loads it."""
import contextlib
from dataclasses import replace

import torch

from .config_tiny import BitNetConfig
from .errors import TrainingError
from .model import BitNetForCausalLM
from .plugged import PluggedError, build_user_model, make_user_optimizer


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


def build_model(cfg: BitNetConfig) -> torch.nn.Module:
    """The model for `cfg`: ours; the user's layer or model (cfg.linear_spec / cfg.model_spec);
    or, for the self-test (cfg.inject_bug), ours with the bug swapped in."""
    if cfg.linear_spec or cfg.model_spec:
        try:
            return build_user_model(cfg)
        except PluggedError as e:
            raise TrainingError(str(e)) from None
    model = BitNetForCausalLM(cfg)
    if cfg.inject_bug:
        from .bugs import inject  # the self-test only
        inject(model, cfg.inject_bug)
    return model


def make_optimizer(model: torch.nn.Module, cfg: BitNetConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer_spec:  # --optimizer: the user's factory, on their own module
        return make_user_optimizer(model, cfg)
    if cfg.inject_bug:  # the self-test's optimizer bugs; None for every other bug
        from .bugs import buggy_optimizer
        if (opt := buggy_optimizer(model, cfg, device)) is not None:
            return opt
    # Weight decay on matrices (latent BitLinear weights, embeddings, head), not on norm gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "decay": True},
              {"params": no_decay, "weight_decay": 0.0, "decay": False}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def with_data_bug(task, cfg: BitNetConfig):
    """The task, re-classed with the self-test's data bug when cfg.inject_bug is one (unshifted_labels,
    bos_mismatch); unchanged otherwise."""
    if not cfg.inject_bug:
        return task
    from .bugs import wrap_task
    return wrap_task(task, cfg.inject_bug)


def check_bug_name(name: str):
    """An unknown --inject-bug NAME is a one-line ValueError listing the known ones."""
    if name:
        from .bugs import get_bug
        get_bug(name)


def prepare_run(cfg: BitNetConfig, task, build: bool):
    """What an experiment takes from here before training, in one call: the task (with the
    self-test's data bug when cfg.inject_bug is one) and, when `build`, the model and optimizer
    training would start from (same seed, on the CPU, not compiled; the global RNG untouched),
    for the checks before training. Building them first also turns a bad SPEC, a factory that
    raises or a wrong output shape into a one-line error before any training."""
    task = with_data_bug(task, cfg)
    if not build:
        return task, None, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(replace(cfg, compile=False))
        optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    return task, model, optimizer


def training_stack(cfg: BitNetConfig, device: torch.device):
    """What the trainer trains with: the model on `device`, its optimizer and the autocast context."""
    model = build_model(cfg).to(device)
    return model, make_optimizer(model, cfg, device), autocast_for(device, cfg.dtype)
