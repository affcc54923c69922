"""Print a completion from a trained run.

    python -m bitnet.generate --checkpoint runs/arith --prompt "5 + 3 ="   # a twin run's OUT: both models
    python -m bitnet.generate --checkpoint runs/tinystories/ternary --prompt "Once upon a time" \
        --max-new-tokens 200 --temperature 0.8 --top-k 50
"""
import argparse
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from .checkpoint import model_from_checkpoint
from .errors import TrainingError, run_main
from .rundir import find_runs


KERNEL_CHOICES = ("auto", "latent", "unpack", "int8")


@dataclass
class Codec:
    """The run's own tokenizer, as inference needs it."""
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    stop_id: int
    number_format: dict = field(default_factory=dict)  # arithmetic runs trained with pad_numbers: {op: widths}
    reverse_answers: bool = False  # arithmetic runs that write answers least-significant digit first

    def completion(self, ids: list[int]) -> str:
        """Generated tokens as text a person reads (a reversed answer back in order)."""
        from .data_arithmetic import read_answer
        return read_answer(self.decode(ids), self.reverse_answers)

    def prompt(self, text: str) -> str:
        """The prompt as the run saw prompts in training ('7 + 12 =' -> '07 + 12 =' for a padded run)."""
        from .data_arithmetic import match_format
        return match_format(text, self.number_format)


def codec_for(identity: dict) -> Codec:
    """Rebuild the tokenizer a checkpoint was trained with, from what the checkpoint stored."""
    task = identity.get("task")
    if task == "arithmetic":
        from .data_arithmetic import CharTokenizer
        tok = CharTokenizer()
        if identity.get("tokenizer") != tok.identity:
            raise TrainingError(f"checkpoint tokenizer {identity.get('tokenizer')!r} is not this version's {tok.identity!r}")
        return Codec(tok.encode, tok.decode, tok.newline_id, identity.get("number_format") or {},
                     bool(identity.get("reverse_answers")))
    if task == "tinystories":
        from .data_tinystories import tokenizer_from_identity
        tok = tokenizer_from_identity(identity)
        eot = tok.token_to_id("<|endoftext|>")
        # training puts <|endoftext|> before every story, so prompts start with it too
        return Codec(lambda s: [eot] + tok.encode(s).ids, lambda ids: tok.decode(ids), eot)
    if task == "text":  # a transformers folder made elsewhere: its tokenizer.json adds its own specials
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(identity["tokenizer"])
        return Codec(lambda s: tok.encode(s).ids, lambda ids: tok.decode(ids), identity.get("eos_token_id"))
    raise TrainingError(f"checkpoint was trained on an unknown task {task!r}")


def load_for_inference(path: str, device: str = "cpu", kernel: str = "auto"):
    """A run folder or ckpt.pt, or a transformers folder (bitnet.export). A folder with 2-bit
    weights runs on them (packing.PackedBitLinear, `kernel` unpack/int8; auto = int8) unless
    kernel="latent", which rebuilds fp32 BitLinear weights that quantize to the same values."""
    from .export import load_any_checkpoint, packed_model_from_checkpoint
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
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 8 for arithmetic, 200 for text")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--kernel", default="auto", choices=KERNEL_CHOICES, help="2-bit folders: matmul path (see packing.py)")
    args = p.parse_args()
    for label, path in runs_at(args.checkpoint).items():
        model, codec, ckpt = load_for_inference(path, args.device, args.kernel)
        n = args.max_new_tokens or (8 if ckpt["task"]["task"] == "arithmetic" else 200)
        prompt = codec.prompt(args.prompt)
        ids = torch.tensor([codec.encode(prompt)], device=args.device)
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        out = model.generate(ids, n, temperature=args.temperature, top_k=args.top_k, stop_token=codec.stop_id,
                             generator=g)
        completion = [t for t in out[0, ids.shape[1]:].tolist() if t != codec.stop_id]
        print((f"[{label}] " if label else "") + prompt + codec.completion(completion))


if __name__ == "__main__":
    run_main(main)
