"""Did a change move a result? The arithmetic script at a fixed step count (no time budget, so no
step count that depends on the machine's speed), in this tree and in a git revision, compared bit
for bit: every weight of the final checkpoint and every evaluation's metrics.

    python bench/same_result.py --against 86b8db5 [--steps 300] [--seeds 1 2] [--dtypes fp32 auto]

The launcher's own runs cannot show this: their time budget turns measured speed into the number
of steps and the LR schedule, so two runs of the same code differ. Prints a line per case and
exits 1 when any differs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"elapsed_s", "tokens_per_s", "mfu", "time", "wall_s", "eval_s", "t", "pid"}


def train(tree: str, out: str, steps: int, seed: int, dtype: str) -> None:
    cmd = [sys.executable, os.path.join(tree, "train_bitnet_arithmetic.py"), "--out-dir", out, "--max-steps",
           str(steps), "--seed", str(seed), "--quant", "ternary", "--no-verdict", "--quiet", "--threads", "1",
           "--set", f"dtype={dtype}", "--set", "compile=false"]
    env = {**os.environ, "PYTHONPATH": os.path.join(tree, "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{tree}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")


def evals(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING and k != "samples"} for r in rows if r.get("kind") == "eval"]


def weights(out: str) -> dict:
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)["model"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--against", required=True, help="a git revision of this repository")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "auto"])
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="same-result-")
    old_tree = os.path.join(work, "tree")
    subprocess.run(["git", "worktree", "add", "--detach", "-q", old_tree, args.against], cwd=REPO, check=True)
    differ = 0
    try:
        for seed in args.seeds:
            for dtype in args.dtypes:
                runs = {}
                for name, tree in (("here", REPO), (args.against, old_tree)):
                    runs[name] = os.path.join(work, f"{name}_s{seed}_{dtype}")
                    train(tree, runs[name], args.steps, seed, dtype)
                a, b = runs.values()
                wa, wb = weights(a), weights(b)
                same_w = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
                same_e = evals(a) == evals(b)
                differ += not (same_w and same_e)
                last = evals(a)[-1]
                print(f"seed {seed} {dtype}: weights {'identical' if same_w else 'DIFFER'}, "
                      f"{len(evals(a))} evaluations {'identical' if same_e else 'DIFFER'} "
                      f"(step {last.get('step')}: {json.dumps({k: v for k, v in last.items() if 'loss' in k})})",
                      flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", old_tree], cwd=REPO)
    print(f"{'no result moved' if not differ else f'{differ} case(s) moved'} against {args.against}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
