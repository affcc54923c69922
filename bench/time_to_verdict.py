"""Wall time from launch to verdict: the arithmetic launcher at its defaults on each injected bug,
a user model with a coupled-Adam optimizer, and the correct stack (last: it trains its whole budget).

    python bench/time_to_verdict.py --out-dir runs/ttv                   # everything (~15 min on 2 cores)
    python bench/time_to_verdict.py --out-dir runs/ttv --only no_ste,correct

Prints one row per case (wall seconds, CPU seconds of the launcher and its children, exit code, verdict, what it named, whether it stopped before
training or early) and writes OUT_DIR/time_to_verdict.json.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
from bitnet.bugs import ALL_BUGS, BUGS, PIPELINE_BUGS  # noqa: E402

USER_MODEL = ["--model", "examples/adapter.py:build", "--optimizer", "examples/adapter.py:adam_l2"]
TARGET_S = {**{b: 20 for b in BUGS}, **{b: 120 for b in PIPELINE_BUGS}, "examples_adam_l2": 120}


def cases() -> dict[str, tuple[list[str], str | None]]:
    """name -> (launcher arguments, the problem the verdict should name; None: OK, not stopped early)."""
    out = {name: (["--inject-bug", name], bug.problem) for name, bug in ALL_BUGS.items()}
    out["examples_adam_l2"] = (USER_MODEL, "coupled_weight_decay")
    out["correct"] = ([], None)
    return out


def run_case(name: str, extra: list[str], out_dir: str) -> dict:
    run_dir = os.path.join(out_dir, name)
    started, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(["./start_arithmetic_experiment.sh", "--out-dir", run_dir, *extra], cwd=ROOT,
                          capture_output=True, text=True)
    seconds, cpu1 = time.time() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)  # the launcher and both children
    with open(os.path.join(out_dir, f"{name}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    verdict = {}
    if os.path.exists(os.path.join(run_dir, "verdict.json")):
        with open(os.path.join(run_dir, "verdict.json")) as f:
            verdict = json.load(f)
    summary = {}
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    return {"case": name, "seconds": round(seconds, 1), "cpu_s": round(cpu, 1), "exit": proc.returncode, "verdict": verdict.get("verdict"),
            "named": verdict.get("suspected_bugs", []),
            "before_training": "before training" in verdict.get("evidence", {}).get("checked", ""),
            "stopped_early": {k: v for k, v in (summary.get("stopped_early") or {}).items() if v},
            "overall": summary.get("overall")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--only", default="", help="comma-separated case names (default: all)")
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    chosen = cases()
    if args.only:
        unknown = set(args.only.split(",")) - set(chosen)
        if unknown:
            sys.exit(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    rows = []
    print(f"{'case':26s}{'s':>7s}{'cpu s':>7s}{'exit':>5s}  {'verdict':8s}{'target':>7s}  ok  named / stop")
    for name, (extra, want) in chosen.items():
        r = run_case(name, extra, args.out_dir)
        target = TARGET_S.get(name)
        if want is None:
            r["ok"] = r["verdict"] != "BROKEN" and not r["stopped_early"]
        else:
            r["ok"] = r["verdict"] == "BROKEN" and r["exit"] == 1 and want in r["named"] and r["seconds"] <= target
        rows.append(r)
        how = "before training" if r["before_training"] else (
            f"early: {json.dumps(r['stopped_early'])[:90]}" if r["stopped_early"] else "full run")
        print(f"{name:26s}{r['seconds']:7.1f}{r['cpu_s']:7.1f}{r['exit']:5d}  {str(r['verdict']):8s}{str(target or '-'):>7s}  "
              f"{'yes' if r['ok'] else 'NO ':3s} {','.join(r['named']) or '-'} / {how}", flush=True)
        with open(os.path.join(args.out_dir, "time_to_verdict.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
