"""An experiment end to end: train (one model, or the ternary model and its full-precision twin
side by side), then the diagnosis and the verdict. The train scripts call run_experiment()."""
import codecs
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

from . import plugged
from .build import prepare_run
from .checkpoint import load_checkpoint, model_from_checkpoint
from .diagnose import QuantHealthTracker, compare_twins, diagnose_run, read_metrics
from .diagnose.early import STOP_FILE, Watch, ask_to_stop, check_before_training, twin_behind
from .diagnose.rules import compare_data, context_free_baseline
from .diagnose.verdict import format_results, judge_user_data
from .distributed import is_main_process
from .errors import INTERNAL_ERROR, Broken, TrainingError, stop_on_signals
from .rundir import CKPT_NAME, METRICS_NAME, out_dir_lock, previous_checkpoint, write_json_atomic
from .trainer import train


def run_experiment(args, cfg, task, script: str, summarize, report, child_args: list[str] = (), conclude=None):
    """Train, then diagnose, while holding OUT_DIR's lock (one run writes an OUT_DIR at a time; under
    torchrun rank 0 holds it for all its processes).

    Single run: train (with quantization health logged at each evaluation), write summary.json,
    print `report(summary)`, then probes, detectors and the verdict.
    --twin: run_twin() trains both models; then the side-by-side comparison and the verdict for
    the pair go to OUT_DIR (summary.json, verdict.json, loss_curves.png, ...).
    `summarize(result) -> dict` and `report(summary)` are the experiment's own; so is
    `conclude({name: summary}, verdict) -> dict`, the last word printed, when given.
    """
    if args.twin and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--twin runs its two models as two plain processes; under torchrun train one model "
                         "per job (--quant ternary, then --quant none)")
    check = not (args.no_verdict or args.resume or args.resume_from_previous)  # a twin's parent checked already
    # the task (with the self-test's data bug, if any); the model and optimizer to check (built once
    # by a twin's parent even without the check: the user's code fails here, not in both children)
    task, model, optimizer = prepare_run(cfg, task, build=check or (args.twin and bool(plugged.parts(cfg))))
    with out_dir_lock(args.out_dir) if is_main_process() else contextlib.nullcontext():
        if check:
            log = print if is_main_process() else (lambda *a: None)
            broken = check_before_training(cfg, task, model, optimizer, args.out_dir if is_main_process() else None,
                                           log)
            if broken and not args.train_anyway:
                raise Broken(broken_line(broken, args.out_dir, "before training"))
        if args.twin:
            outcome = run_pair(args, cfg, task, script, report, child_args, conclude)
        elif getattr(args, "data", None) and not args.no_verdict:
            outcome = run_data_pair(args, cfg, task, script, report, child_args)
        else:
            outcome = run_one(args, cfg, task, summarize, report, conclude)
    if (outcome.get("verdict") or {}).get("verdict") == "BROKEN":
        raise Broken(broken_line(outcome["verdict"], args.out_dir))
    return outcome


def broken_line(verdict: dict, out_dir: str, when: str = "") -> str:
    """The last line of a BROKEN run (run_main prints it and exits 1)."""
    named = ", ".join(verdict["suspected_bugs"]) or verdict["evidence"]["reason"]
    return f"BROKEN{' ' + when if when else ''}: {named} (see {os.path.join(out_dir, 'verdict.json')})"


def run_one(args, cfg, task, summarize, report, conclude=None) -> dict:
    """One model: train it, write summary.json, then (unless it is a twin's child) the verdict."""
    tracker = QuantHealthTracker(lambda: task.get_batch(0, 8)) if cfg.quant == "ternary" else None
    resume = previous_checkpoint(os.path.join(args.out_dir, CKPT_NAME)) if args.resume_from_previous else args.resume
    # decisive evidence (collapsed weights, parameters that never move, a parent's request) stops early
    watch = None if args.train_anyway else Watch(os.path.join(args.out_dir, STOP_FILE))
    with stop_on_signals():  # SIGTERM/SIGINT: save a checkpoint after the current step, exit 143/130
        result = train(cfg, task, args.out_dir, device=args.device, resume=resume, quiet=args.quiet, on_eval=tracker,
                       watch=watch)
    if not is_main_process():  # under torchrun rank 0 alone writes the summary and the verdict
        return {"summary": None}
    summary = {**summarize(result), "stopped_early": result["stopped_early"]}
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


def run_pair(args, cfg, task, script: str, report, child_args=(), conclude=None) -> dict:
    """The ternary model and its twin (run_twin), then the comparison and one verdict for the pair."""
    # the verdict's baseline: the loss reachable from the previous token alone
    baseline = context_free_baseline(task.get_batch)["loss"] if callable(getattr(task, "get_batch", None)) else None

    def judge(ternary: list[dict], twin: list[dict]) -> str | None:
        return twin_behind(ternary, twin, cfg.vocab_size, cfg.warmup_steps, baseline, **task.learning_kwargs)

    # the children get the preset chosen here, so they neither choose nor announce it again
    summaries = run_twin(script, sys.argv[1:], args.out_dir, [*child_args, "--preset", args.preset],
                         judge=None if args.train_anyway else judge)
    for name in ("ternary", "fp"):
        report(summaries[name])
        if summaries[name].get("stopped_early"):
            print(f"{name} stopped early at step {summaries[name]['steps']}: {summaries[name]['stopped_early']}")
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
                       "verdict": verdict["verdict"], "suspected_bugs": verdict["suspected_bugs"],
                       "stopped_early": {name: s.get("stopped_early") for name, s in summaries.items()}, **outcome})
    return {"summaries": summaries, "comparison": comparison, "verdict": verdict, "twin": twin, **outcome}


TWIN_ARMS = (("ternary", ["--quant", "ternary"]), ("fp", ["--quant", "none"]))


DATA_ARMS = (("ours", ["--data", ""]), ("yours", []))  # --data "": the child trains on our batches


def run_data_pair(args, cfg, task, script: str, report, child_args=()) -> dict:
    """--data: check_data's checks on the user's first batches, then the same model trained on our
    batches and on theirs side by side (run_twin's machinery, arms "ours" and "yours"), both scored
    in bits per byte on our held-out text; one verdict, whose part "data" names the loader's faults."""
    checks = task.check_first_batches()
    print("your batches, as check_data reads them:\n" + format_results(checks))
    summaries = run_twin(script, sys.argv[1:], args.out_dir, [*child_args, "--preset", args.preset], arms=DATA_ARMS)
    for name in ("ours", "yours"):
        report(summaries[name])
    runs = {name: os.path.join(args.out_dir, name) for name, _ in DATA_ARMS}
    histories = {name: read_metrics(os.path.join(d, METRICS_NAME))[1] for name, d in runs.items()}
    comparison = compare_data(histories["ours"], histories["yours"], cfg.warmup_steps)
    print(f"\n=== your batches vs ours (same model, config and seed; bits/byte on our held-out text) ===\n"
          f"{comparison['finding']}")
    model = model_from_checkpoint(load_checkpoint(runs["yours"])).eval()
    verdict = diagnose_run(model, histories["yours"], out_dir=args.out_dir, task=task,
                           metrics_paths={name: os.path.join(d, METRICS_NAME) for name, d in runs.items()},
                           learning_kwargs=task.learning_kwargs,
                           amend=lambda probes, v: judge_user_data(v, probes, comparison, checks),
                           **task.diagnosis_inputs(model))
    write_json_atomic(os.path.join(args.out_dir, "summary.json"),
                      {**summaries, "comparison": comparison, "data_checks": checks, "verdict": verdict["verdict"],
                       "suspected_bugs": verdict["suspected_bugs"]})
    return {"summaries": summaries, "comparison": comparison, "verdict": verdict}


def run_twin(script: str, argv: list[str], out_dir: str, child_args: list[str] = (), judge=None,
             arms=TWIN_ARMS) -> dict[str, dict]:
    """Train the ternary model and its full-precision twin at once: same config, seed and data
    order (batches are a function of seed and step), one process each, so on a 2-core CPU the
    pair takes the wall time of one run. The ternary run prints live; the twin logs to a file.
    While they train, watch_pair() stops both early when the evidence is decisive (`judge`).
    Returns {"ternary": summary, "fp": summary} read from each run's summary.json. `arms`, pairs of
    (name, the child's own flags), runs other pairs the same way (run_data_pair: ours and yours).
    """
    argv = [a for a in argv if a != "--twin"] + ["--no-verdict", *child_args]
    threads = max(1, (os.cpu_count() or 2) // 2)
    procs, pumps = {}, []
    for name, own_flags in arms:
        sub = os.path.join(out_dir, name)
        os.makedirs(sub, exist_ok=True)
        if not {"--resume", "--resume-from-previous"} & set(argv) and os.path.exists(os.path.join(sub, METRICS_NAME)):
            os.remove(os.path.join(sub, METRICS_NAME))  # the child would, after start-up; watch_pair reads it before
        # argparse keeps the last occurrence of a flag, so these override anything in argv
        cmd = [sys.executable, script, *argv, *own_flags, "--out-dir", sub, "--threads", str(threads)]
        log = open(os.path.join(sub, "train.log"), "w")
        live = name == arms[0][0]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE if live else log, bufsize=0)
        procs[name] = (proc, log)
        # all of a child's output goes to its train.log (whose path a failure names); the live one's also to ours
        for pipe, echo in [(proc.stdout, sys.stdout if live else None)] + ([(proc.stderr, sys.stderr)] if live else []):
            t = threading.Thread(target=pump, args=(pipe, log, echo), daemon=True)
            t.start()
            pumps.append(t)
    quiet_arm = arms[-1][0]
    print(f"{' and '.join(name for name, _ in arms)} training side by side, {threads} thread(s) each; "
          f"{quiet_arm} logs to {os.path.join(out_dir, quiet_arm, 'train.log')}", flush=True)
    def forward(signum, frame):  # SIGTERM/SIGINT: both children save and stop (each ignores a repeat)
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    old_handlers = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        watch_pair({name: proc for name, (proc, _) in procs.items()}, out_dir, judge)
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
        real = codes - {130, 143}  # a run that failed (the other was stopped so as not to wait for it)
        err.exit_code = ((codes.pop() if len(codes) == 1 else 2) if stopped
                         else real.pop() if len(real) == 1 and real <= {3, 4, INTERNAL_ERROR} else 2)  # NaN, disk full, a bug: say so
        raise err
    summaries = {}
    for name in procs:
        with open(os.path.join(out_dir, name, "summary.json")) as f:
            summaries[name] = json.load(f)
    return summaries


def pump(pipe, log, echo=None):
    """Copy a child's output (an unbuffered binary pipe) into `log` line by line and, when `echo` is
    a stream, onto it as it comes. A progress bar redraws its line with \\r: the log keeps its last state."""
    pending, text = b"", codecs.getincrementaldecoder("utf-8")("replace")  # a bar's blocks may span two reads
    with pipe:
        while chunk := pipe.read(4096):
            if echo is not None:
                echo.write(text.decode(chunk))
                echo.flush()
            *lines, pending = (pending + chunk).split(b"\n")
            pending = pending.rsplit(b"\r", 1)[-1]  # a bar's last state only: memory stays one line
            for line in lines:
                log.write(line.rsplit(b"\r", 1)[-1].decode(errors="replace") + "\n")
            log.flush()
    if pending:
        log.write(pending.rsplit(b"\r", 1)[-1].decode(errors="replace") + "\n")
        log.flush()


def watch_pair(procs: dict, out_dir: str, judge=None, poll_s: float = 1.0):
    """Until both children end: when the ternary model decides to stop early on decisive evidence (a
    "stop_early" line in its metrics.jsonl), ask the twin to stop too; when one fails, stop the other at once
    (SIGTERM: it saves); `judge(ternary_evals, fp_evals) -> reason | None` (twin_behind) stops both.
    A stopped child evaluates and saves first, so the diagnosis reads what was trained."""
    asked, sizes, lines = False, {}, {}
    while any(p.poll() is None for p in procs.values()):
        time.sleep(poll_s)
        if asked:
            continue
        running = [n for n, p in procs.items() if p.poll() is None]
        if any(p.returncode not in (None, 0, 130, 143) for p in procs.values()):  # failed: the other's run no longer matters
            for name in running:
                procs[name].terminate()
            asked = True
            continue
        for name in procs:
            path = os.path.join(out_dir, name, METRICS_NAME)
            try:
                if sizes.get(name) != os.path.getsize(path):
                    sizes[name] = os.path.getsize(path)
                    with open(path) as f:
                        lines[name] = [json.loads(line) for line in f if line.endswith("\n")]
            except (OSError, ValueError):  # not there yet: the next look reads it
                pass
        # the ternary model's own stop only: the verdict judges its history (an fp twin that stops
        # early just frees its core, and the ternary model's watch finds its own evidence)
        lead, other = list(procs)  # the first arm leads (the ternary model; "ours" in a data pair)
        stops = [(lead, e["reason"]) for e in lines.get(lead, [])
                 if e.get("kind") == "stop_early" and e.get("pid") == procs[lead].pid]
        reason = (f"the {stops[0][0]} run stopped: {stops[0][1]}" if stops else
                  judge([e for e in lines[lead] if e.get("kind") == "eval"],
                        [e for e in lines[other] if e.get("kind") == "eval"]) if judge and len(lines) == 2 else None)
        if reason:
            if not stops:
                print(f"twin run: stopping both models: {reason}", flush=True)
            for name in running:
                ask_to_stop(os.path.join(out_dir, name), procs[name].pid, reason)
            asked = True
