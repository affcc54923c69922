"""Training throughput (tokens/s) of a preset, ternary against its full-precision twin.

    python bench/throughput.py --preset tiny-cpu --threads 1 2 [--steps 20] [--reps 3]

Each repetition times every variant back to back in one process, so the ratios hold even when
the machine is shared; report the median. Random token batches of the preset's shape.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
from bitnet.config_tiny import PRESETS  # noqa: E402
from bitnet.model import BitNetForCausalLM  # noqa: E402
from bitnet.build import autocast_for, make_optimizer  # noqa: E402


def time_steps(cfg, steps: int, device) -> float:
    torch.manual_seed(0)
    model = BitNetForCausalLM(cfg).to(device).train()
    opt = make_optimizer(model, cfg, device)
    amp = autocast_for(device, cfg.dtype)
    T = min(cfg.max_position_embeddings, 256)
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, T), device=device)
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with amp:
            _, loss = model(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * x.numel() / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny-cpu", choices=sorted(PRESETS))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = p.parse_args()
    device = torch.device(args.device)
    base = PRESETS[args.preset]().with_overrides(args.set)
    results = {}
    for _ in range(args.reps):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for quant in ("ternary", "none"):
                cfg = base.with_overrides([f"quant={quant}"])
                results.setdefault((threads, quant), []).append(time_steps(cfg, args.steps, device))
    n_params = BitNetForCausalLM(base).num_parameters()
    print(f"preset {args.preset} ({n_params / 1e6:.2f}M params), batch {base.batch_size} x "
          f"{min(base.max_position_embeddings, 256)} tokens, {args.device}, {args.reps} reps, median tokens/s:")
    for (threads, quant), v in sorted(results.items()):
        print(f"  threads={threads}  {quant:8s} {statistics.median(v):10,.0f}   (all: {', '.join(f'{t:,.0f}' for t in v)})")


if __name__ == "__main__":
    main()
