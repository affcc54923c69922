"""What the arithmetic CPU preset's time budget goes on: compiling, a training step, an evaluation.

    python bench/eval_cost.py [--quant ternary] [--cold]

One process, one thread (a twin run gives each model one core). Prints the first compiled step
(compiling; with --cold, in an empty inductor cache, as on a fresh machine), seconds per
compiled training step, and one evaluation (task.evaluate(): every report and validation set,
eager) in seconds and in training steps: evaluating every N steps costs that many steps per N.
"""
import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quant", default="ternary", choices=["ternary", "none"])
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--cold", action="store_true", help="compile into an empty inductor cache")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cold_")
    torch.set_num_threads(1)
    from bitnet.config_tiny import BitNetConfigArithmeticCPU
    from bitnet.data_arithmetic import ArithmeticTask
    from bitnet.build import autocast_for, build_model, make_optimizer

    cfg = replace(BitNetConfigArithmeticCPU(), quant=args.quant, dtype=args.dtype)
    task, dev = ArithmeticTask(cfg), torch.device("cpu")
    model = build_model(cfg)
    opt, amp = make_optimizer(model, cfg, dev), autocast_for(dev, cfg.dtype)
    compiled = torch.compile(model)
    t0 = time.time()
    for i in range(args.steps):
        if i == 1:
            first = time.time() - t0
        if i == 10:
            t10 = time.time()
        x, y = task.get_batch(i, cfg.batch_size)
        with amp:
            _, loss = compiled(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    per_step = (time.time() - t10) / (args.steps - 10)
    model.eval()
    t = time.time()
    with amp, torch.no_grad():
        task.evaluate(model, dev, 0)
    evaluation = time.time() - t
    print(f"{args.quant} {args.dtype}{' (cold cache)' if args.cold else ''}: first step {first:.1f} s, "
          f"{per_step:.3f} s per step, one evaluation {evaluation:.2f} s = {evaluation / per_step:.0f} steps "
          f"(every {cfg.eval_interval} steps: {evaluation / per_step / cfg.eval_interval:.0%} of the training time)")


if __name__ == "__main__":
    main()
