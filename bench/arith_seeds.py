"""The arithmetic launcher over seeds x dtypes: wall time, figures, and the overall word.

    python bench/arith_seeds.py --seeds 1 2 3 4 5 --dtypes auto fp32 [--out-dir runs/seeds] [-- launcher args]

Each run is the whole launcher (`./start_arithmetic_experiment.sh`, twin included), timed from the
outside. Afterwards every model is scored by `python -m bitnet.evaluate` on EVERY problem of the
domain, split into the held-out problems (never trained on) and the rest, so the table does not
rest on the launcher's own samples. Prints a markdown table; writes OUT/table.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))
from bitnet.config_tiny import BitNetConfigArithmeticCPU  # noqa: E402
from bitnet.arithmetic_codec import format_prompt  # noqa: E402
from bitnet.arithmetic_problems import ArithmeticDomain, is_heldout, solve  # noqa: E402


def write_problem_files(out_dir: str) -> dict[str, str]:
    """All problems of the CPU preset's domain, as two files: held-out and in-distribution."""
    dom = ArithmeticDomain.from_config(BitNetConfigArithmeticCPU())
    every = [p for op in dom.operators for p in dom.every(op)]
    paths = {}
    for name, keep in (("heldout", True), ("indist", False)):
        paths[name] = os.path.join(out_dir, f"all_{name}.txt")
        with open(paths[name], "w") as f:
            f.writelines(f"{format_prompt(a, op, b)} {solve(a, op, b)}\n" for a, op, b in every
                         if is_heldout(a, op, b, dom.heldout_fraction) == keep)
    return paths


def score(run_dir: str, path: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bitnet.evaluate", "--checkpoint", run_dir, "--arithmetic", path],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"evaluate failed on {run_dir}: {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["per_op"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--dtypes", nargs="+", default=["auto", "fp32"])
    p.add_argument("--out-dir", default=os.path.join(REPO, "runs", "seeds"))
    p.add_argument("launcher_args", nargs="*", help="after --: passed to the launcher")
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    files = write_problem_files(args.out_dir)
    table_path = os.path.join(args.out_dir, "table.json")
    rows = json.load(open(table_path)) if os.path.exists(table_path) else []
    for seed in args.seeds:
        for dtype in args.dtypes:
            out = os.path.join(args.out_dir, f"seed{seed}_{dtype}")
            t0 = time.time()
            proc = subprocess.run([os.path.join(REPO, "start_arithmetic_experiment.sh"), "--out-dir", out,
                                   "--seed", str(seed), "--set", f"dtype={dtype}", *args.launcher_args],
                                  capture_output=True, text=True, cwd=REPO)
            wall = time.time() - t0
            with open(os.path.join(out, "launcher.log"), "w") as f:
                f.write(proc.stdout + proc.stderr)
            if proc.returncode:
                print(f"seed {seed} {dtype}: launcher exit {proc.returncode}; see {out}/launcher.log", flush=True)
                continue
            s = json.load(open(os.path.join(out, "summary.json")))
            row = {"seed": seed, "dtype": dtype, "wall_s": round(wall), "overall": s.get("overall"),
                   "verdict": s["verdict"]}
            for name in ("ternary", "fp"):
                t = s[name]
                row[name] = {"steps": t["steps"], "solved": t["solved"], "lr": t["learning_rate"],
                             "train_s": round(t["elapsed_s"]), "bar": t["bar"],
                             "all_indist": score(os.path.join(out, name), files["indist"]),
                             "all_heldout": score(os.path.join(out, name), files["heldout"])}
            rows = [r for r in rows if (r["seed"], r["dtype"]) != (seed, dtype)] + [row]
            with open(table_path, "w") as f:
                json.dump(rows, f, indent=1)
            print(format_row(row), flush=True)
    print("\n| seed | dtype | wall s | overall | model | steps | solved | in-dist + - * / (all problems) | "
          "held-out + - (all) |\n|---|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["dtype"], r["seed"])):
        print(format_row(row))


def format_row(row: dict) -> str:
    def pct(d, ops):
        return " / ".join("-" if d.get(o) is None else f"{100 * d[o]:.1f}" for o in ops)
    lines = []
    for name in ("ternary", "fp"):
        m = row[name]
        lines.append(f"| {row['seed']} | {row['dtype']} | {row['wall_s']} | {row['overall']} | {name} (lr {m['lr']:g}) | "
                     f"{m['steps']} | {m['solved']} | {pct(m['all_indist'], '+-*/')} | {pct(m['all_heldout'], '+-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
