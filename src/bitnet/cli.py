"""Command-line plumbing shared by the train scripts: common flags, config building,
one-line errors, and thread settings."""
import argparse
import contextlib
import json
import os
import sys
from dataclasses import replace

import torch

from . import plugged
from .config_tiny import PRESETS
from .diagnose.bugs import BUG_NAMES as BUGS
from .distributed import is_main_process
from .trainer import (CKPT_NAME, TrainingError, out_dir_lock, pick_device, previous_checkpoint, stop_on_signals,
                      write_json_atomic)


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
    p.add_argument("--inject-bug", default="", choices=[""] + list(BUGS), metavar="NAME",
                   help=f"self-test: switch on one known bug ({', '.join(BUGS)})")
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
    p.add_argument("--no-verdict", action="store_true", help=argparse.SUPPRESS)  # set for the twin's children
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-eval lines")
    p.add_argument("--dry-run", nargs="?", type=int, const=1, metavar="GPUS",
                   help="print the plan (parameters, FLOPs, memory, wall time on GPUS GPUs, default 1) as one "
                        "JSON line and exit; builds nothing real")
    return p


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
    from .plan import dry_run as plan_line
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
    from .spec import split_spec

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
    from .trainer import CKPT_NAME, PLUG_DEFAULTS, PREV_CKPT_NAME, load_checkpoint
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
                print(f"--resume: your parts as the run was started: "
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


def run_main(main):
    """Run `main()`, turning expected problems into one line on stderr and an exit code:
    0 done, 2 bad input, 3 non-finite loss, 130/143 stopped by SIGINT/SIGTERM after saving."""
    try:
        return main()
    except (TrainingError, ValueError, OSError, UnicodeDecodeError) as e:
        code = getattr(e, "exit_code", 2)
        print(f"{'stopped' if code > 128 else 'error'}: {e}", file=sys.stderr)
        sys.exit(code)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact, continue with --resume", file=sys.stderr)
        sys.exit(130)


def run_twin(script: str, argv: list[str], out_dir: str, child_args: list[str] = ()) -> dict[str, dict]:
    """Train the ternary model and its full-precision twin at once: same config, seed and data
    order (batches are a function of seed and step), one process each, so on a 2-core CPU the
    pair takes the wall time of one run. The ternary run prints live; the twin logs to a file.
    Returns {"ternary": summary, "fp": summary} read from each run's summary.json.
    """
    import signal
    import subprocess
    import threading

    argv = [a for a in argv if a != "--twin"] + ["--no-verdict", *child_args]
    threads = max(1, (os.cpu_count() or 2) // 2)
    procs, pumps = {}, []
    for name, quant in (("ternary", "ternary"), ("fp", "none")):
        sub = os.path.join(out_dir, name)
        os.makedirs(sub, exist_ok=True)
        # argparse keeps the last occurrence of a flag, so these override anything in argv
        cmd = [sys.executable, script, *argv, "--quant", quant, "--out-dir", sub, "--threads", str(threads)]
        log = open(os.path.join(sub, "train.log"), "w")
        live = name == "ternary"
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None if live else log, text=True, bufsize=1)
        procs[name] = (proc, log)

        def pump(p=proc, f=log, echo=live):
            for line in p.stdout:
                f.write(line)
                f.flush()
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        pumps.append(t)
    print(f"twin run: ternary and full-precision models training side by side, {threads} thread(s) each; "
          f"the fp twin logs to {os.path.join(out_dir, 'fp', 'train.log')}", flush=True)
    def forward(signum, frame):  # SIGTERM/SIGINT: both children save and stop (each ignores a repeat)
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    old_handlers = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for t in pumps:
            t.join()
        for proc, log in procs.values():
            proc.wait()
            log.close()
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
    failed = [f"{name} (exit {proc.returncode}, see {os.path.join(out_dir, name, 'train.log')})"
              for name, (proc, _) in procs.items() if proc.returncode != 0]
    if failed:
        codes = {proc.returncode for proc, _ in procs.values() if proc.returncode != 0}
        stopped = codes <= {130, 143}  # SIGINT/SIGTERM: each run saved its checkpoint
        err = TrainingError(("twin run stopped (continue with --resume): " if stopped else "twin run failed: ")
                            + "; ".join(failed))
        err.exit_code = codes.pop() if len(codes) == 1 and codes <= {3, 130, 143} else 2  # both stopped alike: say so
        raise err
    summaries = {}
    for name in procs:
        with open(os.path.join(out_dir, name, "summary.json")) as f:
            summaries[name] = json.load(f)
    return summaries


def check_user_stack(cfg):
    """Build the user's ternary model and optimizer once (trainer.build_model, make_optimizer): a bad
    SPEC, a factory that raises or a wrong output shape is a one-line error before any training."""
    from .trainer import build_model, make_optimizer
    with torch.random.fork_rng(devices=[]):
        make_optimizer(build_model(cfg), cfg, torch.device("cpu"))


def run_experiment(args, cfg, task, script: str, summarize, report, child_args: list[str] = (), conclude=None):
    """run_experiment_unlocked() while holding OUT_DIR's lock: one run writes an OUT_DIR at a time.
    Under torchrun the job is one run: rank 0 holds the lock for all its processes."""
    with out_dir_lock(args.out_dir) if is_main_process() else contextlib.nullcontext():
        return run_experiment_unlocked(args, cfg, task, script, summarize, report, child_args, conclude)


def run_experiment_unlocked(args, cfg, task, script: str, summarize, report, child_args: list[str] = (),
                            conclude=None):
    """The shared tail of both train scripts.

    Single run: train (with quantization health logged at each evaluation), write
    summary.json, print `report(summary)`, then probes, detectors and the verdict.
    --twin: run_twin() trains both models; then the side-by-side comparison and the verdict
    for the pair go to OUT_DIR (summary.json, verdict.json, loss_curves.png, ...).
    `summarize(result) -> dict` and `report(summary)` are the experiment's own; so is
    `conclude({name: summary}, verdict) -> dict`, the last word printed, when given.
    """
    from .diagnose import QuantHealthTracker, compare_twins, diagnose_run, read_metrics
    from .trainer import METRICS_NAME, load_checkpoint, model_from_checkpoint, train

    from .diagnose.bugs import wrap_task
    task = wrap_task(task, cfg.inject_bug)  # the self-test's data bugs (unshifted_labels, bos_mismatch)
    if args.twin and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--twin runs its two models as two plain processes; under torchrun train one model "
                         "per job (--quant ternary, then --quant none)")
    if args.twin:
        if plugged.parts(cfg):  # the user's code fails here, in one line, rather than in both children
            check_user_stack(cfg)
        # the children get the preset chosen here, so they neither choose nor announce it again
        summaries = run_twin(script, sys.argv[1:], args.out_dir, [*child_args, "--preset", args.preset])
        for name in ("ternary", "fp"):
            report(summaries[name])
        runs = {name: os.path.join(args.out_dir, name) for name in ("ternary", "fp")}
        model = model_from_checkpoint(load_checkpoint(runs["ternary"]))
        twin = plugged.twin_kind(model_from_checkpoint(load_checkpoint(runs["fp"])))
        histories = {name: read_metrics(os.path.join(d, METRICS_NAME))[1] for name, d in runs.items()}
        table, comparison = compare_twins(histories["ternary"], histories["fp"], task.milestones(), task.metric_keys)
        print(f"\n=== ternary vs full-precision twin (same config, seed and data order) ===\ntwin: {twin}\n{table}")
        stack = {"parts": plugged.parts(cfg), "twin": twin}
        verdict = diagnose_run(model, histories["ternary"], histories["fp"], out_dir=args.out_dir,
                               metrics_paths={"ternary": os.path.join(runs["ternary"], METRICS_NAME),
                                              "fp twin": os.path.join(runs["fp"], METRICS_NAME)},
                               learning_kwargs=task.learning_kwargs, stack=stack, task=task,
                               **task.diagnosis_inputs(model))
        outcome = conclude(summaries, verdict) if conclude else {}
        write_json_atomic(os.path.join(args.out_dir, "summary.json"),
                          {"ternary": summaries["ternary"], "fp": summaries["fp"], "comparison": comparison,
                           "twin": twin, "plugged": stack["parts"], "your_stack": verdict.get("your_stack"),
                           "verdict": verdict["verdict"], "suspected_bugs": verdict["suspected_bugs"], **outcome})
        return {"summaries": summaries, "comparison": comparison, "verdict": verdict, "twin": twin, **outcome}

    tracker = QuantHealthTracker(lambda: task.get_batch(0, 8)) if cfg.quant == "ternary" else None
    resume = previous_checkpoint(os.path.join(args.out_dir, CKPT_NAME)) if args.resume_from_previous else args.resume
    with stop_on_signals():  # SIGTERM/SIGINT: save a checkpoint after the current step, exit 143/130
        result = train(cfg, task, args.out_dir, device=args.device, resume=resume, quiet=args.quiet, on_eval=tracker)
    if not is_main_process():  # under torchrun rank 0 alone writes the summary and the verdict
        return {"summary": None}
    summary = summarize(result)
    write_json_atomic(os.path.join(args.out_dir, "summary.json"), summary)
    if args.no_verdict:  # a twin's child: the parent reports both runs together
        return {"summary": summary}
    report(summary)
    model = result["model"].eval()
    verdict = diagnose_run(model, result["history"], out_dir=args.out_dir,
                           metrics_paths={cfg.quant: os.path.join(args.out_dir, METRICS_NAME)},
                           learning_kwargs=task.learning_kwargs, task=task,
                           stack={"parts": plugged.parts(cfg), "twin": None} if plugged.parts(cfg) else None,
                           **task.diagnosis_inputs(model))
    outcome = conclude({cfg.quant: summary}, verdict) if conclude else {}
    return {"summary": summary, "verdict": verdict, **outcome}
