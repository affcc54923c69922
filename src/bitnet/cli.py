"""Command-line plumbing shared by the train scripts: common flags, config building,
one-line errors, and thread settings."""
import argparse
import json
import os
import sys

import torch

from .config_tiny import PRESETS
from .model import BUGS
from .trainer import TrainingError


def common_parser(description: str, default_preset: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out-dir", required=True, help="where ckpt.pt, metrics.jsonl and the summary go")
    p.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                   help=f"config class from bitnet/config_tiny.py (default {default_preset})")
    p.add_argument("--max-steps", type=int, help="override the preset's max_steps")
    p.add_argument("--quant", choices=["ternary", "none"], default="ternary",
                   help="ternary = BitNet b1.58; none = the full-precision twin")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, help="override the preset's seed")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set learning_rate=3e-3 (repeatable)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = choose: 1 per process in twin runs, else all cores)")
    p.add_argument("--inject-bug", default="", choices=[""] + list(BUGS), metavar="NAME",
                   help=f"self-test: switch on one known bug ({', '.join(BUGS)})")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-eval lines")
    return p


def build_config(args):
    cfg = PRESETS[args.preset]()
    pairs = list(args.set)
    if args.max_steps is not None:
        pairs.append(f"max_steps={args.max_steps}")
    if args.seed is not None:
        pairs.append(f"seed={args.seed}")
    pairs += [f"quant={args.quant}", f"inject_bug={args.inject_bug}"]
    cfg = cfg.with_overrides(pairs)
    if cfg.max_steps < 1 or cfg.batch_size < 1 or cfg.eval_interval < 1:
        raise ValueError("max_steps, batch_size and eval_interval must be >= 1")
    if cfg.learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {cfg.learning_rate}")
    return cfg


def set_threads(n: int):
    if n > 0:
        torch.set_num_threads(n)


def write_json_atomic(path: str, obj):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def run_main(main):
    """Run `main()`, turning expected problems into one line on stderr and exit code 2."""
    try:
        return main()
    except (TrainingError, ValueError, FileNotFoundError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact, continue with --resume", file=sys.stderr)
        sys.exit(130)
