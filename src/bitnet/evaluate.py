"""Score a trained run on a file; the last line printed is one JSON object.

    python -m bitnet.evaluate --checkpoint runs/arith --arithmetic problems.txt
        FILE: one problem per line, `12 + 7 = 19`. Each left side is greedy-decoded; the first
        wrong answers are printed as a person writes them (--raw: as the model wrote them).
        -> {"n": ..., "accuracy": ..., "per_op": {"+": ..., "-": ..., "*": ..., "/": ...}}
    python -m bitnet.evaluate --checkpoint runs/tinystories/ternary --text valid.txt
        FILE: documents in the official format (each followed by a line <|endoftext|>).
        -> {"n_tokens": ..., "val_loss": ..., "bits_per_byte": ...}
A twin run's OUT (holding ternary/ and fp/) evaluates both models and prints them side by side;
the JSON line then holds the ternary figures, with the twin's under "fp".
"""
import argparse
import json
from collections import defaultdict

import torch

from .arithmetic_codec import parse_problem
from .data_tinystories import read_text_file, text_metrics
from .errors import run_main
from .generate import KERNEL_CHOICES, load_for_inference, runs_at

SHOW_WRONG = 3  # wrong answers printed per operator


def read_problems(path: str, codec) -> list[tuple[str, str, str, str]]:
    """(op, the line as a person wrote it, the model's prompt, the model's answer) for each
    non-blank line; a bad line is a one-line error naming it."""
    problems = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                a, op, b, want = parse_problem(line)
                person = f"{a} {op} {b} = {want}"
                prompt, answer = codec.to_model(person).split("=", 1)  # '3 * 4 = 12' -> '03 * 04 =', ' 21'
                codec.encode(prompt + "=")
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: cannot use {line.strip()!r}: {e}") from None
            problems.append((op, person, prompt + "=", answer.strip()))
    if not problems:
        raise ValueError(f"{path} holds no problems; write one per line like '12 + 7 = 19'")
    return problems


@torch.no_grad()
def greedy_answers(model, codec, prompts: list[str], device, batch_size: int = 512) -> list[str]:
    """The model's own greedy completions, batched by prompt length (no padding needed, so no mask)."""
    by_len = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(codec.encode(p))].append(i)
    answers = [""] * len(prompts)
    for idxs in by_len.values():
        for k in range(0, len(idxs), batch_size):
            chunk = idxs[k:k + batch_size]
            ids = torch.tensor([codec.encode(prompts[i]) for i in chunk], device=device)
            out = model.generate(ids, codec.max_new_tokens, stop_token=codec.stop_id)[:, ids.shape[1]:]
            for i, row in zip(chunk, out.tolist()):
                row = row[:row.index(codec.stop_id)] if codec.stop_id in row else row
                answers[i] = codec.decode(row)
    return answers


def evaluate_problems(model, codec, path: str, device, raw: bool = False) -> dict:
    """Exact match of each greedy answer with the answer in the model's own format (what training
    scores), per operator."""
    problems = read_problems(path, codec)
    answers = greedy_answers(model, codec, [prompt for _, _, prompt, _ in problems], device)
    right, count, wrong = defaultdict(int), defaultdict(int), defaultdict(list)
    for (op, person, prompt, want), got in zip(problems, answers):
        count[op] += 1
        right[op] += got.strip() == want
        if got.strip() != want and len(wrong[op]) < SHOW_WRONG:
            written = prompt + got.rstrip()
            shown, wanted = (written, want) if raw else (codec.display(written), person.split("= ", 1)[1])
            wrong[op].append(f"  wrong: {shown}  (want {wanted})")
    for op in count:
        print(f"{op}: {right[op]}/{count[op]} exact")
        for line in wrong[op]:
            print(line)
    n = sum(count.values())
    return {"n": n, "accuracy": sum(right.values()) / n,
            "per_op": {op: (right[op] / count[op] if count[op] else None) for op in "+-*/"}}


def main():
    p = argparse.ArgumentParser(description="Score a trained run on a file.")
    p.add_argument("--checkpoint", required=True, help="a run's OUT_DIR (or its ckpt.pt), or a transformers BitNet folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--arithmetic", metavar="FILE", help="problems like '12 + 7 = 19', one per line")
    src.add_argument("--text", metavar="FILE", help="documents in the official <|endoftext|> format")
    p.add_argument("--max-tokens", type=int, default=0, help="--text: score at most this many tokens (0 = all)")
    p.add_argument("--raw", action="store_true",
                   help="--arithmetic: print wrong answers as the model wrote them (its training format)")
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
    what = f"{args.checkpoint} is a {ckpt['task'].get('task')} run"
    if args.arithmetic:
        if codec.kind != "problems":
            raise ValueError(f"--arithmetic needs a run that answers problems like '12 + 7 = 19'; {what} (use --text)")
        return evaluate_problems(model, codec, args.arithmetic, args.device, getattr(args, "raw", False))
    if codec.tokenizer is None:
        raise ValueError(f"--text needs a run trained on text; {what} (use --arithmetic)")
    return text_metrics(model, codec.tokenizer, read_text_file(args.text), args.device, args.max_tokens)


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
