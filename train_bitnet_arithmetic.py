"""Train a BitNet b1.58 model (or its full-precision twin) on synthetic arithmetic.

    python train_bitnet_arithmetic.py --out-dir runs/arith               # CPU preset on a CPU
    python train_bitnet_arithmetic.py --out-dir runs/arith --quant none  # the fp twin
    python train_bitnet_arithmetic.py --out-dir runs/arith --set learning_rate=2e-3
"""
import torch

from bitnet.cli import build_config, common_parser, run_main, set_threads, write_json_atomic
from bitnet.data_arithmetic import ArithmeticTask
from bitnet.trainer import train


def main():
    p = common_parser(__doc__.split("\n")[0], default_preset="")
    args = p.parse_args()
    if not args.preset:  # the 5M seed config on a GPU; the small preset on a CPU
        args.preset = "arithmetic" if torch.cuda.is_available() and args.device != "cpu" else "arithmetic-cpu"
    set_threads(args.threads)
    cfg = build_config(args)
    task = ArithmeticTask(cfg)
    result = train(cfg, task, args.out_dir, device=args.device, resume=args.resume, quiet=args.quiet)
    final = result["final"]
    ok, failures = task.passed(final)
    summary = {
        "experiment": "arithmetic", "preset": args.preset, "quant": cfg.quant, "inject_bug": cfg.inject_bug,
        "n_params": result["n_params"], "steps": final["step"], "elapsed_s": result["elapsed_s"],
        "tokens_per_s": result["tokens_per_s"], "loss_start": result["history"][0]["indist_answer_loss"],
        "loss_end": final["indist_answer_loss"], "final": final, "pass": ok, "failures": failures,
    }
    write_json_atomic(f"{args.out_dir}/summary.json", summary)
    print(f"\n=== arithmetic, {cfg.quant}, {result['n_params'] / 1e6:.2f}M params, {final['step']} steps, "
          f"{result['elapsed_s'] / 60:.1f} min ===")
    print(task.format_eval(final))
    print(f"answer loss {summary['loss_start']:.3f} -> {summary['loss_end']:.4f}")
    print(("PASS" if ok else "FAIL") + ": >= 99% exact match on every operator (in-distribution) and on held-out +/-"
          + ("" if ok else "; short: " + ", ".join(failures)))


if __name__ == "__main__":
    run_main(main)
