"""Train a BitNet b1.58 model (or its full-precision twin) on synthetic arithmetic.

    python train_bitnet_arithmetic.py --out-dir runs/arith               # CPU preset on a CPU
    python train_bitnet_arithmetic.py --out-dir runs/arith --twin        # ternary and fp twin, then a verdict
    python train_bitnet_arithmetic.py --out-dir runs/arith --quant none  # the fp twin alone
    python train_bitnet_arithmetic.py --out-dir runs/arith --set learning_rate=2e-3
"""
import os

from bitnet.cli import build_config, choose_preset, common_parser, dry_run, run_experiment, run_main, set_threads
from bitnet.data_arithmetic import ArithmeticTask


def main():
    args = common_parser(__doc__.split("\n")[0], gpu_preset="arithmetic", cpu_preset="arithmetic-cpu").parse_args()
    choose_preset(args)  # the 5M seed config on a GPU; the small preset on a CPU
    set_threads(args.threads)
    cfg = build_config(args)
    if dry_run(args, cfg):
        return
    task = ArithmeticTask(cfg)

    def summarize(result):
        final = result["final"]
        ok, failures = task.passed(final)
        return {"experiment": "arithmetic", "preset": args.preset, "quant": cfg.quant, "inject_bug": cfg.inject_bug,
                "n_params": result["n_params"], "steps": final["step"], "elapsed_s": result["elapsed_s"],
                "tokens_per_s": result["tokens_per_s"], "loss_start": result["history"][0]["indist_answer_loss"],
                "loss_end": final["indist_answer_loss"], "final": final, "pass": ok, "failures": failures}

    def report(s):
        print(f"\n=== arithmetic, {s['quant']}, {s['n_params'] / 1e6:.2f}M params, {s['steps']} steps, "
              f"{s['elapsed_s'] / 60:.1f} min ===")
        print(task.format_eval(s["final"]))
        print(f"answer loss {s['loss_start']:.3f} -> {s['loss_end']:.4f}")
        print(("PASS" if s["pass"] else "FAIL") + ": >= 99% exact match on every operator (in-distribution) and on "
              "held-out +/-" + ("" if s["pass"] else "; short: " + ", ".join(s["failures"])))

    run_experiment(args, cfg, task, os.path.abspath(__file__), summarize, report)


if __name__ == "__main__":
    run_main(main)
