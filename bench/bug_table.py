"""The self-test table: the arithmetic experiment with each injected bug, and the correct stack
on several seeds, each judged by the end-of-run verdict.

    python bench/bug_table.py --out-dir runs/bugtable [--max-steps 500] [--jobs 2]
    python bench/bug_table.py --pipeline --seeds 1 2 3 --max-steps 400 -- --set compile=false   # issue 11
    python bench/bug_table.py --budgets 100 200 300 500 --seeds 1 2 3 --dtypes fp32 auto    # issue 26
    python bench/bug_table.py --all-bugs --seeds --max-steps 300                              # issue 26

Runs are single (no twin): the probes name an injected bug whatever the training did, and the
correct stack must *learn* within the step budget to be judged OK. With --budgets the correct
stack runs with its twin at each step budget, seed and dtype: it must never read BROKEN (OK or
INCONCLUSIVE), and the table gives the share of the twin's progress the ternary model made. Prints a Markdown table
(paste it into RESULTS.md) and writes OUT_DIR/table.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
from bitnet.bugs import ALL_BUGS, BUGS, PIPELINE_BUGS  # noqa: E402


def run_one(name: str, extra: list[str], args) -> dict:
    out = os.path.join(args.out_dir, name)
    cmd = [sys.executable, os.path.join(ROOT, "train_bitnet_arithmetic.py"), "--out-dir", out, "--quiet",
           "--threads", "1", "--max-steps", str(args.max_steps), "--set", f"eval_interval={args.max_steps}",
           *args.extra, *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"run": name, "seconds": round(time.time() - t0, 1), "exit": proc.returncode}
    try:
        with open(os.path.join(out, "verdict.json")) as f:
            verdict = json.load(f)
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        ternary = summary.get("ternary", summary)  # a twin run's summary holds both
        row.update(verdict=verdict["verdict"], suspected_bugs=verdict["suspected_bugs"],
                   failed_checks=verdict["failed_checks"], answer_loss=ternary["loss_end"],
                   indist_acc=ternary["final"]["indist_acc"],
                   parts=[f"{f['part']}: {f['problem']}" for f in verdict.get("faults", [])],
                   deviations=[d["problem"] for d in verdict.get("deviations", [])])
        if "fp" in summary:
            progress = verdict["evidence"].get("progress") or {}
            row.update(twin_answer_loss=summary["fp"]["loss_end"], twin_indist_acc=summary["fp"]["final"]["indist_acc"],
                       share=progress.get("share"), baseline=progress.get("baseline_loss"),
                       ternary_learns=verdict["evidence"]["ternary_learns"], twin_learns=verdict["evidence"]["twin_learns"])
    except (OSError, KeyError, json.JSONDecodeError):
        row.update(verdict="(no verdict)", error=proc.stderr.strip().splitlines()[-1:] or [""])
    print(f"  {name}: {row.get('verdict')} {row.get('suspected_bugs', '')} ({row['seconds']} s)", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="runs/bugtable")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3, 4, 5], help="correct-stack seeds (none: bugs only)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--pipeline", action="store_true",
                   help="the 6 pipeline bugs of issue 11 (not the 8 model bugs), each at every --seeds seed, "
                        "seed by seed, beside the correct stack")
    p.add_argument("--bugs", nargs="*", help="with --pipeline or --all-bugs: only these runs ('correct' for the correct stack)")
    p.add_argument("--all-bugs", action="store_true", help="all 14 injected bugs (model and pipeline), one run each")
    p.add_argument("--budgets", type=int, nargs="*", help="the correct stack with --twin at each of these --max-steps")
    p.add_argument("--dtypes", nargs="*", default=["auto"], help="with --budgets: each dtype (fp32, bf16, auto)")
    p.add_argument("extra", nargs="*", help="more train-script flags after --, e.g. -- --set batch_size=64")
    args = p.parse_args()
    if args.budgets:
        budget_table(args)
        return
    if args.all_bugs:
        plan = [(f"correct-seed{s}", ["--seed", str(s)]) for s in args.seeds]
        plan += [(bug, ["--inject-bug", bug]) for bug in (args.bugs or ALL_BUGS)]  # in the order asked
    elif args.pipeline:  # all runs of seed 1 first, then seed 2, ...: a cut-short table still covers every bug
        plan = [(name, [*(["--inject-bug", bug] if bug else []), "--seed", str(s)])
                for s in args.seeds for bug in ["", *PIPELINE_BUGS]
                for name in [f"{bug or 'correct'}-seed{s}"] if not args.bugs or (bug or "correct") in args.bugs]
    else:
        plan = [(f"correct-seed{s}", ["--seed", str(s)]) for s in args.seeds]
        plan += [(bug, ["--inject-bug", bug]) for bug in BUGS]
    print(f"{len(plan)} runs of {args.max_steps} steps, {args.jobs} at a time")
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda item: run_one(item[0], item[1], args), plan))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"table-{args.max_steps}.json" if args.pipeline else "table.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print("\n| run | verdict | suspected_bugs | faults (part: problem) | failed checks | answer loss | in-dist acc | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['verdict']} | {', '.join(r.get('suspected_bugs', []))} | "
              f"{', '.join(r.get('parts', []))} | "
              f"{', '.join(r.get('failed_checks', []))} | {r.get('answer_loss', float('nan')):.3f} | "
              f"{r.get('indist_acc', float('nan')):.1%} | {r['seconds']} |")
    # a bug is caught when the verdict is BROKEN and names the problem the bug is registered with
    def bug_of(run):
        return run.rsplit("-seed", 1)[0] if args.pipeline else run
    # a bug is named, and nothing else is (issue 26)
    alone = all(r.get("suspected_bugs") == [ALL_BUGS[bug_of(r["run"])].problem] for r in rows
                if not r["run"].startswith("correct"))
    expected = all(r["verdict"] == "OK" for r in rows if r["run"].startswith("correct")) and all(
        r["verdict"] == "BROKEN" and ALL_BUGS[bug_of(r["run"])].problem in r.get("suspected_bugs", []) for r in rows
        if not r["run"].startswith("correct"))
    print(f"\nall as expected: {expected}; every bug named alone: {alone}")


def budget_table(args):
    """The correct stack with its twin at each step budget x seed x dtype: never BROKEN."""
    plan = [(f"correct-{n}steps-seed{s}-{d}", ["--twin", "--seed", str(s),
                                               *(["--set", f"dtype={d}"] if d != "auto" else [])], n)
            for s in args.seeds for d in args.dtypes for n in args.budgets]  # a cut-short table has whole seeds

    def one(item):
        name, extra, steps = item
        return run_one(name, extra, argparse.Namespace(**{**vars(args), "max_steps": steps}))
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, plan))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "budgets.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print("\n| run | verdict | share of twin's progress | answer loss ternary / twin | in-dist acc ternary / twin | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        share = r.get("share")
        print(f"| {r['run']} | {r['verdict']} | {'-' if share is None else f'{share:.2f}'} | "
              f"{r.get('answer_loss', float('nan')):.3f} / {r.get('twin_answer_loss', float('nan')):.3f} | "
              f"{r.get('indist_acc', float('nan')):.1%} / {r.get('twin_indist_acc', float('nan')):.1%} | {r['seconds']} |")
    print(f"\nnever BROKEN: {all(r['verdict'] in ('OK', 'INCONCLUSIVE') for r in rows)}")


if __name__ == "__main__":
    main()
