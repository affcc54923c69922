"""Print a completion from a trained run.

    python -m bitnet.generate --checkpoint runs/arith --prompt "5 + 3 ="   # a twin run's OUT: both models
    python -m bitnet.generate --checkpoint runs/arith --prompt "5 + 3 =" --raw   # as the model wrote it
    python -m bitnet.generate --checkpoint runs/tinystories/ternary --prompt "Once upon a time" \
        --max-new-tokens 200 --temperature 0.8 --top-k 50
"""
import argparse
import os

import torch

from .checkpoint import model_from_checkpoint
from .errors import run_main
from .export import load_any_checkpoint, packed_model_from_checkpoint
from .rundir import find_runs
from .tasks import codec_for


KERNEL_CHOICES = ("auto", "latent", "unpack", "int8")


def load_for_inference(path: str, device: str = "cpu", kernel: str = "auto"):
    """A run folder or ckpt.pt, or a transformers folder (bitnet.export). A folder with 2-bit
    weights runs on them (packing.PackedBitLinear, `kernel` unpack/int8; auto = int8) unless
    kernel="latent", which rebuilds fp32 BitLinear weights that quantize to the same values."""
    ckpt = load_any_checkpoint(path, latent=kernel == "latent")
    if ckpt.get("packed") is not None and kernel != "latent":
        model = packed_model_from_checkpoint(ckpt, "int8" if kernel == "auto" else kernel, device)
    else:
        model = model_from_checkpoint(ckpt, device)
    return model, codec_for(ckpt.get("task", {})), ckpt


def runs_at(path: str) -> dict[str, str]:
    """{label: run} for a run's OUT_DIR; a twin run's OUT gives both models, ternary first
    (OUT/ternary itself is one model: the user pointed at it)."""
    ternary, twin, root = find_runs(path)
    return {"ternary": ternary, "fp twin": twin} if twin and os.path.samefile(root, path) else {"": path}


def main():
    p = argparse.ArgumentParser(description="Print a completion from a trained run.")
    p.add_argument("--checkpoint", required=True,
                   help="a run's OUT_DIR (or its ckpt.pt; a twin run's OUT gives both), or a transformers BitNet folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (8 for arithmetic, 200 for text)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--kernel", default="auto", choices=KERNEL_CHOICES, help="2-bit folders: matmul path (see packing.py)")
    p.add_argument("--raw", action="store_true",
                   help="print the prompt and completion as the model reads and writes them (e.g. '05 + 03 = 008' "
                        "for a run trained with pad_numbers), not as a person writes them")
    args = p.parse_args()
    for label, path in runs_at(args.checkpoint).items():
        model, codec, _ = load_for_inference(path, args.device, args.kernel)
        prompt = codec.to_model(args.prompt)  # '5 + 3 =' -> '05 + 03 =' for a run trained with padded numbers
        ids = torch.tensor([codec.encode(prompt)], device=args.device)
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        out = model.generate(ids, args.max_new_tokens or codec.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, stop_token=codec.stop_id, generator=g)
        written = prompt + codec.decode([t for t in out[0, ids.shape[1]:].tolist() if t != codec.stop_id])
        print((f"[{label}] " if label else "") + (written if args.raw else codec.display(written)))


if __name__ == "__main__":
    run_main(main)
