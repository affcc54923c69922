"""The train scripts' flags and how they become a config: common_parser() -> choose_preset() ->
build_config() (checked by check_config), and --dry-run. Running it is experiment.py's job."""
import argparse
import json
import os
import sys
from dataclasses import replace

import torch

from .build import check_bug_name, pick_device
from .checkpoint import PLUG_DEFAULTS, load_checkpoint
from .config_tiny import PRESETS
from .plan import dry_run as plan_line
from .rundir import CKPT_NAME, PREV_CKPT_NAME
from .spec import split_spec


def common_parser(description: str, gpu_preset: str, cpu_preset: str) -> argparse.ArgumentParser:
    """The flags both train scripts share. Without --preset, choose_preset() picks `gpu_preset`
    when training on CUDA and `cpu_preset` otherwise."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out-dir", required=True, help="where ckpt.pt, metrics.jsonl and the summary go")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"config class from bitnet/config_tiny.py (default: {gpu_preset} on a CUDA GPU, "
                        f"{cpu_preset} otherwise)")
    p.set_defaults(presets_by_device=(gpu_preset, cpu_preset))
    p.add_argument("--max-steps", type=int, help="override the preset's max_steps (and switch off its time budget)")
    p.add_argument("--time-budget", type=parse_duration, metavar="T",
                   help="training time per model, e.g. 9m, 90s, 1h (0 = off): after warm-up, steps and schedule "
                        "are set from the measured speed; overrides --max-steps")
    p.add_argument("--quant", choices=["ternary", "none"], default="ternary",
                   help="ternary = BitNet b1.58; none = the full-precision twin")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, help="override the preset's seed")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    p.add_argument("--resume-from-previous", action="store_true",
                   help="continue from OUT_DIR/ckpt.prev.pt, the checkpoint before the latest (when ckpt.pt is damaged)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set learning_rate=3e-3 (repeatable)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = choose: 1 per process in twin runs, else all cores)")
    p.add_argument("--inject-bug", default="", metavar="NAME",
                   help="self-test: switch on one known bug from bitnet/bugs.py (an unknown NAME lists them)")
    p.add_argument("--linear", default="", metavar="SPEC",
                   help="your layer class for every projection of our model: module:Class or file.py:Class, built "
                        "as Class(in, out, bias=False) (or Class(in, out)); the twin keeps nn.Linear")
    p.add_argument("--model", default="", metavar="SPEC",
                   help="your model: a factory f(cfg[, linear_cls=...]) -> nn.Module mapping input_ids [B, T] to "
                        "logits [B, T, V]; the twin is it with nn.Linear (see bitnet/plugged.py)")
    p.add_argument("--optimizer", default="", metavar="SPEC",
                   help="your optimizer: a factory f(model, cfg) -> torch.optim.Optimizer, in place of AdamW; the "
                        "schedule scales each of its groups' initial lr")
    p.add_argument("--path", action="append", default=[], metavar="DIR",
                   help="put DIR first on sys.path before the SPECs resolve (repeatable)")
    p.add_argument("--twin", action="store_true",
                   help="train the ternary model and its full-precision twin side by side, then compare and judge")
    p.add_argument("--train-anyway", action="store_true",
                   help="train the whole budget even when a check before training finds the stack BROKEN, and "
                        "never stop early (for the learning comparison); the verdict still comes at the end")
    p.add_argument("--no-verdict", action="store_true", help=argparse.SUPPRESS)  # set for the twin's children
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-eval lines")
    p.add_argument("--dry-run", nargs="?", type=int, const=1, metavar="GPUS",
                   help="print the plan (parameters, FLOPs, memory, wall time on GPUS GPUs, default 1) as one "
                        "JSON line and exit; builds nothing real")
    return p


def add_user_data_args(p: argparse.ArgumentParser):
    """--data: the TinyStories experiment on your own loader's batches beside ours (bitnet/data_user.py)."""
    g = p.add_argument_group("your data loader (README, \"Check your own data\")")
    g.add_argument("--data", metavar="SPEC", help="factory of your training batches (module:name or file.py:name, as "
                                                  "for check_data): the same model trains on yours and on ours, "
                                                  "scored in bits/byte on our held-out text")
    g.add_argument("--data-kwargs", default="{}", metavar="JSON", help="keyword arguments for --data's factory")
    g.add_argument("--data-tokenizer", metavar="PATH", help="the tokenizer of --data's ids when they are not ours (a "
                                                            "tokenizer.json or a transformers folder): that run's "
                                                            "model gets its vocabulary and our held-out text is "
                                                            "encoded with it")


def parse_duration(text: str) -> float:
    """'90s', '9m', '1.5h' or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    num, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 9m, 90s or 1h, got {text!r}") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"a time budget cannot be negative, got {text!r}")
    return seconds


def dry_run(args, cfg) -> bool:
    """--dry-run: print bitnet.plan.dry_run's line; True if it did (the script then exits)."""
    if args.dry_run is None:
        return False
    if args.dry_run < 1:
        raise ValueError(f"--dry-run GPUS must be >= 1, got {args.dry_run}")
    if cfg.model_spec:
        raise ValueError("--dry-run plans our own model's parameters and memory; it cannot plan a --model of yours "
                         "(drop --model to plan ours at this config)")
    print(json.dumps(plan_line(cfg, world_size=args.dry_run)))
    return True


def choose_preset(args) -> bool:
    """Fill in args.preset from the device when --preset was not given; True if it did."""
    if args.preset:
        return False
    gpu_preset, cpu_preset = args.presets_by_device
    args.preset = gpu_preset if pick_device(args.device).type == "cuda" else cpu_preset
    return True


def build_config(args):
    cfg = PRESETS[args.preset]()
    pairs = list(args.set)
    if args.max_steps is not None:  # explicit steps: the preset's time budget no longer decides them
        pairs += [f"max_steps={args.max_steps}", "time_budget_s=0"]
    if args.seed is not None:
        pairs.append(f"seed={args.seed}")
    if getattr(args, "time_budget", None) is not None:
        pairs.append(f"time_budget_s={args.time_budget}")
    pairs += [f"quant={args.quant}", f"inject_bug={args.inject_bug}"]
    cfg = replace(cfg.with_overrides(pairs), **(plugs_of_resumed_run(args) or plug_fields(args)))
    if cfg.quant == "none" and cfg.fp_learning_rate > 0:  # the twin trains at its own tuned rate
        cfg = cfg.with_overrides([f"learning_rate={cfg.fp_learning_rate}"])
    check_config(cfg)
    return cfg


def plug_fields(args) -> dict:
    """--linear/--model/--optimizer/--path as config fields, with file SPECs and folders made absolute,
    so that a checkpoint rebuilds the user's model from any directory."""
    def absolute(flag):
        spec = getattr(args, flag, "") or ""
        if not spec:
            return ""
        try:
            target, name = split_spec(spec)
        except ValueError as e:
            raise ValueError(f"--{flag} {spec}: {e}") from None
        return f"{os.path.abspath(target)}:{name}" if target.endswith(".py") or os.sep in target else spec

    return {"linear_spec": absolute("linear"), "model_spec": absolute("model"), "optimizer_spec": absolute("optimizer"),
            "spec_paths": os.pathsep.join(os.path.abspath(p) for p in getattr(args, "path", None) or ())}


def plugs_of_resumed_run(args) -> dict:
    """--resume with none of --linear/--model/--optimizer/--path: the parts the run was started with,
    read from its checkpoint (a twin run's ternary one), so a resume need not repeat them. {} otherwise."""
    if not (getattr(args, "resume", False) or getattr(args, "resume_from_previous", False)):
        return {}
    if any(getattr(args, flag, None) for flag in ("linear", "model", "optimizer", "path")):
        return {}  # given: they must match the checkpoint's (restore_run says so when they do not)
    name = PREV_CKPT_NAME if getattr(args, "resume_from_previous", False) else CKPT_NAME
    for folder in (args.out_dir, os.path.join(args.out_dir, "ternary")):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            saved = load_checkpoint(path).get("config", {})
            plugs = {k: saved.get(k, v) for k, v in PLUG_DEFAULTS.items()}
            if any(plugs.values()):
                print("--resume: your parts as the run was started: "
                      + "; ".join(f"{k} {v}" for k, v in plugs.items() if v), file=sys.stderr)
            return plugs
    return {}


def check_config(cfg):
    """Values no run can train with, caught before a model is built: one-line ValueErrors naming the fix."""
    for name in ("max_steps", "batch_size", "eval_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}; pass e.g. --set {name}={getattr(type(cfg), name)}")
    if not cfg.learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {cfg.learning_rate}; pass e.g. --set learning_rate=3e-3")
    if not cfg.checkpoint_interval_s >= 0:
        raise ValueError(f"checkpoint_interval_s must be >= 0 seconds, got {cfg.checkpoint_interval_s}; e.g. --set checkpoint_interval_s=60")
    check_bug_name(cfg.inject_bug)
    if cfg.inject_bug and (cfg.linear_spec or cfg.model_spec):
        raise ValueError("--inject-bug swaps a bug into our own model; drop it with --linear/--model "
                         "(python -m bitnet.check_layer judges a layer alone)")
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads < 1 or kv < 1 or cfg.hidden_size % heads or heads % kv:
        raise ValueError(f"hidden_size {cfg.hidden_size} must divide by num_attention_heads {heads}, and that by "
                         f"num_key_value_heads {kv}; change one with --set (e.g. num_attention_heads=4 num_key_value_heads=4)")


def set_threads(n: int):
    if n > 0:
        torch.set_num_threads(n)
