"""Command-line plumbing shared by the train scripts: common flags, config building,
one-line errors, and thread settings."""
import argparse
import json
import os
import sys

import torch

from .config_tiny import PRESETS
from .model import BUGS
from .trainer import TrainingError, pick_device, write_json_atomic


def common_parser(description: str, gpu_preset: str, cpu_preset: str) -> argparse.ArgumentParser:
    """The flags both train scripts share. Without --preset, choose_preset() picks `gpu_preset`
    when training on CUDA and `cpu_preset` otherwise."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out-dir", required=True, help="where ckpt.pt, metrics.jsonl and the summary go")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"config class from bitnet/config_tiny.py (default: {gpu_preset} on a CUDA GPU, "
                        f"{cpu_preset} otherwise)")
    p.set_defaults(presets_by_device=(gpu_preset, cpu_preset))
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
    p.add_argument("--twin", action="store_true",
                   help="train the ternary model and its full-precision twin side by side, then compare and judge")
    p.add_argument("--no-verdict", action="store_true", help=argparse.SUPPRESS)  # set for the twin's children
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-eval lines")
    p.add_argument("--dry-run", nargs="?", type=int, const=1, metavar="GPUS",
                   help="print the plan (parameters, FLOPs, memory, wall time on GPUS GPUs, default 1) as one "
                        "JSON line and exit; builds nothing real")
    return p


def dry_run(args, cfg) -> bool:
    """--dry-run: print bitnet.plan.dry_run's line; True if it did (the script then exits)."""
    if args.dry_run is None:
        return False
    from .plan import dry_run as plan_line
    if args.dry_run < 1:
        raise ValueError(f"--dry-run GPUS must be >= 1, got {args.dry_run}")
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


def run_twin(script: str, argv: list[str], out_dir: str, child_args: list[str] = ()) -> dict[str, dict]:
    """Train the ternary model and its full-precision twin at once: same config, seed and data
    order (batches are a function of seed and step), one process each, so on a 2-core CPU the
    pair takes the wall time of one run. The ternary run prints live; the twin logs to a file.
    Returns {"ternary": summary, "fp": summary} read from each run's summary.json.
    """
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
    for t in pumps:
        t.join()
    failed = []
    for name, (proc, log) in procs.items():
        proc.wait()
        log.close()
        if proc.returncode != 0:
            failed.append(f"{name} (exit {proc.returncode}, see {os.path.join(out_dir, name, 'train.log')})")
    if failed:
        raise TrainingError("twin run failed: " + "; ".join(failed))
    summaries = {}
    for name in procs:
        with open(os.path.join(out_dir, name, "summary.json")) as f:
            summaries[name] = json.load(f)
    return summaries


def run_experiment(args, cfg, task, script: str, summarize, report, child_args: list[str] = ()):
    """The shared tail of both train scripts.

    Single run: train (with quantization health logged at each evaluation), write
    summary.json, print `report(summary)`, then probes, detectors and the verdict.
    --twin: run_twin() trains both models; then the side-by-side comparison and the verdict
    for the pair go to OUT_DIR (summary.json, verdict.json, loss_curves.png, ...).
    `summarize(result) -> dict` and `report(summary)` are the experiment's own.
    """
    from .diagnose import QuantHealthTracker, compare_twins, diagnose_run, read_metrics
    from .distributed import is_main_process
    from .trainer import METRICS_NAME, load_checkpoint, model_from_checkpoint, train

    if args.twin and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--twin runs its two models as two plain processes; under torchrun train one model "
                         "per job (--quant ternary, then --quant none)")
    if args.twin:
        # the children get the preset chosen here, so they neither choose nor announce it again
        summaries = run_twin(script, sys.argv[1:], args.out_dir, [*child_args, "--preset", args.preset])
        for name in ("ternary", "fp"):
            report(summaries[name])
        runs = {name: os.path.join(args.out_dir, name) for name in ("ternary", "fp")}
        model = model_from_checkpoint(load_checkpoint(runs["ternary"]))
        histories = {name: read_metrics(os.path.join(d, METRICS_NAME))[1] for name, d in runs.items()}
        table, comparison = compare_twins(histories["ternary"], histories["fp"], task.milestones(), task.metric_keys)
        print(f"\n=== ternary vs full-precision twin (same config, seed and data order) ===\n{table}")
        verdict = diagnose_run(model, histories["ternary"], histories["fp"], out_dir=args.out_dir,
                               metrics_paths={"ternary": os.path.join(runs["ternary"], METRICS_NAME),
                                              "fp twin": os.path.join(runs["fp"], METRICS_NAME)},
                               learning_kwargs=task.learning_kwargs, **task.diagnosis_inputs(model))
        write_json_atomic(os.path.join(args.out_dir, "summary.json"),
                          {"ternary": summaries["ternary"], "fp": summaries["fp"], "comparison": comparison,
                           "verdict": verdict["verdict"], "suspected_bugs": verdict["suspected_bugs"]})
        return {"summaries": summaries, "comparison": comparison, "verdict": verdict}

    tracker = QuantHealthTracker(lambda: task.get_batch(0, 8)) if cfg.quant == "ternary" else None
    result = train(cfg, task, args.out_dir, device=args.device, resume=args.resume, quiet=args.quiet, on_eval=tracker)
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
                           learning_kwargs=task.learning_kwargs, **task.diagnosis_inputs(model))
    return {"summary": summary, "verdict": verdict}
