"""Score a trained run on a file; the last line printed is one JSON object.

    python -m bitnet.evaluate --checkpoint runs/arith --arithmetic problems.txt
        FILE: one problem per line, `12 + 7 = 19`. Each left side is greedy-decoded.
        -> {"n": ..., "accuracy": ..., "per_op": {"+": ..., "-": ..., "*": ..., "/": ...}}
    python -m bitnet.evaluate --checkpoint runs/tinystories/ternary --text valid.txt
        FILE: stories in the official format (each followed by a line <|endoftext|>).
        -> {"n_tokens": ..., "val_loss": ..., "bits_per_byte": ...}
A twin run's OUT (holding ternary/ and fp/) evaluates both models and prints them side by side;
the JSON line then holds the ternary figures, with the twin's under "fp".
"""
import argparse
import json
from collections import defaultdict

import torch

from .errors import run_main
from .data_arithmetic import format_prompt, parse_problem
from .generate import KERNEL_CHOICES, load_for_inference, runs_at


def read_problems(path: str, encode, prompt_format=lambda text: text) -> list[tuple[str, str, int]]:
    """(prompt, op, expected) for each non-blank line; a bad line is a one-line error naming it."""
    problems = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                a, op, b, want = parse_problem(line)
                prompt = prompt_format(format_prompt(a, op, b))
                encode(prompt)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: cannot use {line.strip()!r}: {e}") from None
            problems.append((prompt, op, want))
    if not problems:
        raise ValueError(f"{path} holds no problems; write one per line like '12 + 7 = 19'")
    return problems


@torch.no_grad()
def greedy_answers(model, codec, prompts: list[str], device, batch_size: int = 512) -> list[str]:
    """Greedy completions, batched by prompt length (no padding needed, so no mask)."""
    by_len = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(codec.encode(p))].append(i)
    answers = [""] * len(prompts)
    for idxs in by_len.values():
        for k in range(0, len(idxs), batch_size):
            chunk = idxs[k:k + batch_size]
            ids = torch.tensor([codec.encode(prompts[i]) for i in chunk], device=device)
            out = model.generate(ids, 8, stop_token=codec.stop_id)[:, ids.shape[1]:]
            for i, row in zip(chunk, out.tolist()):
                row = row[:row.index(codec.stop_id)] if codec.stop_id in row else row
                answers[i] = codec.completion(row).strip()
    return answers


def evaluate_arithmetic(model, codec, path: str, device) -> dict:
    problems = read_problems(path, codec.encode, codec.prompt)
    answers = greedy_answers(model, codec, [p for p, _, _ in problems], device)
    right, count = defaultdict(int), defaultdict(int)
    for (prompt, op, want), got in zip(problems, answers):
        count[op] += 1
        right[op] += got == (f"{want:0{codec.number_format[op][2]}d}" if op in codec.number_format else str(want))
    for op in count:
        print(f"{op}: {right[op]}/{count[op]} exact")
    n = sum(count.values())
    return {"n": n, "accuracy": sum(right.values()) / n,
            "per_op": {op: (right[op] / count[op] if count[op] else None) for op in "+-*/"}}


def main():
    p = argparse.ArgumentParser(description="Score a trained run on a file.")
    p.add_argument("--checkpoint", required=True, help="a run's OUT_DIR (or its ckpt.pt), or a transformers BitNet folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--arithmetic", metavar="FILE", help="problems like '12 + 7 = 19', one per line")
    src.add_argument("--text", metavar="FILE", help="stories in the official <|endoftext|> format")
    p.add_argument("--max-tokens", type=int, default=0, help="--text: score at most this many tokens (0 = all)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--kernel", default="auto", choices=KERNEL_CHOICES, help="2-bit folders: matmul path (see packing.py)")
    args = p.parse_args()
    results = {label: evaluate_run(path, args) for label, path in runs_at(args.checkpoint).items()}
    if len(results) > 1:
        print(side_by_side(results))
        result = {**results["ternary"], "fp": results["fp twin"]}
    else:
        result = next(iter(results.values()))
    print(json.dumps(result))


def evaluate_run(path: str, args) -> dict:
    model, codec, ckpt = load_for_inference(path, args.device, args.kernel)
    task = ckpt["task"]["task"]
    if args.arithmetic:
        if task != "arithmetic":
            raise ValueError(f"--arithmetic needs an arithmetic run; {args.checkpoint} is a {task} run (use --text)")
        return evaluate_arithmetic(model, codec, args.arithmetic, args.device)
    if task not in ("tinystories", "text"):
        raise ValueError(f"--text needs a TinyStories run; {args.checkpoint} is a {task} run (use --arithmetic)")
    from .data_tinystories import read_text_file, text_metrics, tokenizer_from_identity
    text = read_text_file(args.text)
    return text_metrics(model, tokenizer_from_identity(ckpt["task"]), text, args.device, args.max_tokens)


def side_by_side(results: dict[str, dict]) -> str:
    """One row per figure, one column per model."""
    def flat(r):
        return {**{k: v for k, v in r.items() if not isinstance(v, dict)},
                **{f"{k} {op}": x for k, v in r.items() if isinstance(v, dict) for op, x in v.items()}}
    cols = {label: flat(r) for label, r in results.items()}
    keys = list(next(iter(cols.values())))
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    rows = [f"{'':<14}" + "".join(f"{label:>14}" for label in cols)]
    rows += [f"{k:<14}" + "".join(f"{fmt(c.get(k)):>14}" for c in cols.values()) for k in keys]
    return "\n".join(rows)


if __name__ == "__main__":
    run_main(main)
