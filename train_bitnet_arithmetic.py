"""Train a BitNet b1.58 model (or its full-precision twin) on synthetic arithmetic.

    python train_bitnet_arithmetic.py --out-dir runs/arith               # CPU preset on a CPU
    python train_bitnet_arithmetic.py --out-dir runs/arith --twin        # ternary and fp twin, then a verdict
    python train_bitnet_arithmetic.py --out-dir runs/arith --quant none  # the fp twin alone
    python train_bitnet_arithmetic.py --out-dir runs/arith --set learning_rate=2e-3
"""
import os

import torch

from bitnet.cli import build_config, choose_preset, common_parser, dry_run, set_threads
from bitnet.data_arithmetic import ArithmeticTask
from bitnet.diagnose.rules import conclude
from bitnet.errors import run_main
from bitnet.experiment import run_experiment


def main():
    args = common_parser(__doc__.split("\n")[0], gpu_preset="arithmetic", cpu_preset="arithmetic-cpu").parse_args()
    choose_preset(args)  # the 5M seed config on a GPU; the small preset on a CPU
    set_threads(args.threads)
    cfg = build_config(args)
    if dry_run(args, cfg):
        return
    task = ArithmeticTask(cfg)

    def summarize(result):
        final, model = result["final"], result["model"].eval()
        bar, short = task.passed(final)
        completions = task.sample_lines(model, next(model.parameters()).device, torch.Generator().manual_seed(777), n_per_op=5)
        return {"experiment": "arithmetic", "preset": args.preset, "quant": cfg.quant, "inject_bug": cfg.inject_bug,
                "n_params": result["n_params"], "learning_rate": cfg.learning_rate, "steps": final["step"],
                "planned_steps": result["max_steps"], "time_budget_s": cfg.time_budget_s, "solved": result["solved"],
                "elapsed_s": result["elapsed_s"], "tokens_per_s": result["tokens_per_s"],
                "loss_start": result["history"][0]["indist_answer_loss"], "loss_end": final["indist_answer_loss"],
                "completions": completions, "completions_ok": sum(ln.endswith("  ok") for ln in completions),
                "final": final, "bar": bar, "bar_short": short}

    def report(s):
        print(f"\n=== arithmetic, {s['quant']}, {s['n_params'] / 1e6:.2f}M params, lr {s['learning_rate']:g}, "
              f"{s['steps']} steps, {s['elapsed_s'] / 60:.1f} min ===")
        print(task.format_eval(s["final"]))
        print(f"answer loss {s['loss_start']:.3f} -> {s['loss_end']:.4f}; greedy completions "
              f"{s['completions_ok']}/{len(s['completions'])} correct")
        print("our bar (>= 99% on every operator, in-distribution and held-out): "
              + ("reached" if s["bar"] else "not reached: " + ", ".join(s["bar_short"])))

    run_experiment(args, cfg, task, os.path.abspath(__file__), summarize, report, conclude=lambda summaries, verdict: conclude(summaries, verdict, task.thresholds))


if __name__ == "__main__":
    run_main(main)
