"""Judge a training data pipeline: `python -m bitnet.check_data --batches SPEC [--val-batches SPEC] [--tokenizer PATH|SPEC]`.

SPEC (`package.module:name` or `path/to/file.py:name`, resolved as for check_layer) names a
factory returning an iterable of training batches (or the iterable itself); `--kwargs JSON` is
passed to it. A factory that takes `rank` and `world_size` is called for rank 0 of 1 (the
batches judged) and for ranks 0 and 1 of 2 (are they different?). At most --max-batches are
read, so a streaming loader works. Conventions, told apart by what the loader yields: a
LongTensor [B, T] (the loss shifts), (x, y) pairs (y is x shifted), dicts with input_ids /
labels / attention_mask (labels equal input_ids, the model shifts; --model-shifts overrides).
The checks are in bitnet/diagnose/data_checks.py (the batches read by diagnose/batches.py); the problems they name in diagnose/problems.py.
Prints what was detected, one row per check with its evidence, a picture to check by eye (rows
decoded with document boundaries and special tokens shown, document lengths, padding, the most
frequent tokens), and last a JSON line {"verdict", "problems", "convention"}.
Exit 0 OK, 1 BROKEN, 2 when the loader, tokenizer or a SPEC cannot be used (one line).
"""
import argparse
import contextlib
import inspect
import json
import re
import sys
import time

import numpy as np

from .diagnose.batches import Data, DataError, read_batches, token_counts
from .diagnose.data_checks import (check_inference_start, check_labels, check_padding, check_range, check_ranks,
                                   check_repeats, check_separators, check_tokenizer_text, check_val)
from .diagnose.local_hub import hub_to_local, parse_mapping
from .diagnose.problems import PROBLEMS, is_deviation
from .diagnose.tokenizer_checks import (TokenizerError, examples_of, roundtrip_report, tokenizer_of,
                                        whitespace_probe)
from .spec import SpecError, resolve_spec
from .errors import run_main

DEFAULT_PROMPT = "Once upon a time"
SHIFT_NOTE = {True: "labels sit at their own input's position: the model shifts",
              False: "labels are the inputs shifted by one: the model does not shift"}


def model_shifts_by_default(convention: str) -> bool:
    """input_ids alone and transformers' `labels` mean the model shifts; (x, y) and `targets` / `y` mean
    the loader did (nanoGPT, llama2.c)."""
    return convention in ("input_ids", "(input_ids, attention_mask)") or "labels" in convention


def takes_rank(factory) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "rank" in params and "world_size" in params


def accepted(f, kwargs: dict) -> dict:
    """The --kwargs a function takes (all of them when it has **kwargs)."""
    try:
        params = inspect.signature(f).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def open_loader(obj, kwargs: dict, label: str, **rank):
    """The iterable a SPEC names: the object itself, or what calling the factory returns."""
    if not inspect.isclass(obj) and (not callable(obj) or hasattr(obj, "__iter__")):
        return obj  # already an iterable (a list, a DataLoader)
    try:
        return obj(**accepted(obj, kwargs), **rank)
    except Exception as e:  # noqa: BLE001 - the user's factory fails in any way: one line
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = "; pass its arguments with --kwargs JSON" if "required" in text and "argument" in text else ""
        raise DataError(f"{label} raised {type(e).__name__}: {text}{hint}") from None


def load(spec: str, paths, kwargs: dict, max_batches: int, label: str, **rank):
    factory = resolve_spec(spec, paths)
    with contextlib.redirect_stdout(sys.stderr):  # a loader's prints stay off our table and JSON line
        return read_batches(open_loader(factory, kwargs, f"{label} {spec}", **rank), max_batches, f"{label} {spec}")


def shown(data: Data, row: np.ndarray, pad: np.ndarray, width: int = 320) -> str:
    """A row as text: specials as [name], padding as [pad]xN, newlines as a visible mark."""
    if data.codec is None:
        return " ".join(map(str, row[:64].tolist())) + (" ..." if len(row) > 64 else "")
    parts, run = [], []
    for tok, is_pad in zip(row.tolist(), pad.tolist()):
        if tok in data.codec.special_ids or is_pad:
            if run:
                parts.append(data.codec.decode(run).replace("\n", "\u23ce"))
                run = []
            parts.append("[pad]" if is_pad else f"[{data.codec.name_of(tok)}]")
        else:
            run.append(tok)
    if run:
        parts.append(data.codec.decode(run).replace("\n", "\u23ce"))
    text = "".join(parts)
    text = re.sub(r"(\[pad\])+", lambda m: f"[pad]x{len(m.group(0)) // 5}", text)
    return text if len(text) <= width else text[:width * 2 // 3] + " ... " + text[-width // 3:]  # the end shows padding


def picture(data: Data, docs, rows: int = 3) -> list[str]:
    lines = ["rows as the model sees them ([name] = special token, \u23ce = newline):"]
    where = [(0, i) for i in range(min(rows - 1, len(data.batches[0].x)))]
    for want in (lambda x, p: p.any(), lambda x, p: np.isin(x[1:], list(data.separators)).any()):
        hit = next(((j, i) for j, (b, pad) in enumerate(zip(data.batches, data.pad))
                    for i in range(len(b.x)) if want(b.x[i], pad[i])), None)  # a row with padding, one with a boundary
        if hit is not None and hit not in where and len(where) < rows + 1:
            where.append(hit)
    lines += [f"  batch {j} row {i}: {shown(data, data.batches[j].x[i], data.pad[j][i])}" for j, i in where]
    lengths = np.array([len(d) for d, complete in docs if complete])
    if data.codec is None:
        lines.append("documents: needs --tokenizer")
    elif len(lengths):
        q = np.percentile(lengths, [0, 10, 50, 90, 100]).astype(int)
        lines.append(f"documents: {len(lengths):,} complete, length in tokens min {q[0]} p10 {q[1]} median {q[2]} "
                     f"p90 {q[3]} max {q[4]}; {len(docs) - len(lengths):,} cut by a row edge")
    else:
        lines.append(f"documents: none complete ({len(docs):,} pieces between row edges; no separator closes one)")
    n_pad = sum(int(p.sum()) for p in data.pad)
    lines.append(f"padding: {n_pad / data.n_positions:.1%} of {data.n_positions:,} positions"
                 + (f" (from {data.pad_source})" if data.pad_source else " (no mask or pad id known)"))
    counts = token_counts(data)
    top = np.argsort(-counts)[:10]
    total = max(int(counts.sum()), 1)
    name = (lambda i: repr(data.codec.name_of(i))) if data.codec else (lambda i: f"#{i}")
    lines.append("most frequent tokens: " + ", ".join(f"{name(int(i))} {counts[i] / total:.1%}" for i in top if counts[i]))
    return lines


def format_table(checks: list[dict]) -> str:
    lines = [f"{'check':<22} {'result':<6} {'problem':<24} evidence"]
    for c in checks:
        result = "n/a" if "skipped" in c["evidence"] else "pass" if c["passed"] else "FAIL"
        ev = c["evidence"].get("finding") or json.dumps(c["evidence"], default=str)
        lines.append(f"{c['name']:<22} {result:<6} {c['suspected_bug'] or '-':<24} {ev[:300]}")
    return "\n".join(lines)


def roundtrip_check(codec, examples: list[str]) -> dict:
    """check_tokenizer's decode(encode(x)) == x on the raw text: its first problem names the row."""
    r = roundtrip_report(codec, examples)
    evidence = {k: r[k] for k in ("examples", "exact_match_rate", "unk_rate", "examples_failing_by_cause")}
    if r["problems"]:
        d = r["first_difference"] or {}
        evidence["finding"] = (f"decode(encode(x)) != x for {1 - r['exact_match_rate']:.0%} of {r['examples']} documents "
                               f"({', '.join(r['problems'])}); first: {d.get('original', '')[:60]!r} -> "
                               f"{d.get('decoded', '')[:60]!r}")
    return {"name": "tokenizer_roundtrip", "passed": not r["problems"], "evidence": evidence,
            "suspected_bug": r["problems"][0] if r["problems"] else None}


def first_words(docs, codec) -> str:
    """The opening words of a training document (a prompt as a user would type it)."""
    for tokens, complete in docs:
        if complete:
            words = codec.decode(tokens[:16].tolist()).split()
            if len(words) >= 3:
                return " ".join(words[:4])
    return DEFAULT_PROMPT


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Check a training data pipeline: labels, padding, documents, ranks, "
                                            "validation split, tokenizer.")
    p.add_argument("--batches", required=True, metavar="SPEC", help="factory of training batches: module:name or file.py:name")
    p.add_argument("--val-batches", metavar="SPEC", help="factory of validation batches")
    p.add_argument("--tokenizer", metavar="PATH|SPEC", help="tokenizer.json, a transformers folder, or a SPEC naming one")
    p.add_argument("--encode", metavar="SPEC", help="how inference encodes a prompt: f(text) -> ids "
                                                    "(default: the tokenizer with its special tokens)")
    p.add_argument("--text", metavar="FILE", help="raw text the loader reads: check_tokenizer's round trip on it too")
    p.add_argument("--kwargs", default="{}", metavar="JSON", help="keyword arguments for the factories, a JSON object")
    p.add_argument("--path", action="append", default=[], metavar="DIR", help="put DIR first on sys.path (repeatable)")
    p.add_argument("--max-batches", type=int, default=200, help="training batches read (default 200)")
    p.add_argument("--model-shifts", choices=("auto", "yes", "no"), default="auto",
                   help="does the model shift labels itself? auto: yes for input_ids and dicts with labels, "
                        "no for (x, y) and dicts with targets")
    p.add_argument("--ignore-index", type=int, default=-100, help="the loss's ignore index (default -100)")
    p.add_argument("--vocab-size", type=int, help="the model's vocabulary size (default: the tokenizer's)")
    p.add_argument("--local-dataset", action="append", default=[], metavar="NAME[:SPLIT]=FILE",
                   help="serve datasets.load_dataset(NAME) from a local file (repeatable; see docs/check_data.md)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise DataError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
        if args.max_batches < 1:
            raise DataError("--max-batches must be at least 1")
        with hub_to_local(parse_mapping(args.local_dataset)):
            codec = tokenizer_of(args.tokenizer, args.path) if args.tokenizer else None
            encode = None
            if args.encode:
                encode_fn = resolve_spec(args.encode, args.path)
                encode = lambda text: encode_fn(text, **accepted(encode_fn, kwargs))  # noqa: E731
            factory = resolve_spec(args.batches, args.path)
            ranked = takes_rank(factory)
            rank = {"rank": 0, "world_size": 1} if ranked else {}
            batches, convention = load(args.batches, args.path, kwargs, args.max_batches, "--batches", **rank)
            rank0 = rank1 = None
            if ranked:
                k = min(args.max_batches, 20)
                rank0 = load(args.batches, args.path, kwargs, k, "--batches (rank 0 of 2)", rank=0, world_size=2)[0]
                rank1 = load(args.batches, args.path, kwargs, k, "--batches (rank 1 of 2)", rank=1, world_size=2)[0]
            val = None
            if args.val_batches:
                val_batches, _ = load(args.val_batches, args.path, kwargs, min(args.max_batches, 50), "--val-batches")
        shifts = {"yes": True, "no": False}.get(args.model_shifts, model_shifts_by_default(convention))
        data = Data(batches, convention, shifts, codec, args.ignore_index, args.vocab_size)
        if args.val_batches:
            val = Data(val_batches, convention, shifts, codec, args.ignore_index, args.vocab_size)
    except json.JSONDecodeError as e:
        print(f"error: --kwargs is not valid JSON ({e})", file=sys.stderr)
        return 2
    except (SpecError, DataError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.text and codec is None:
        print("error: --text needs --tokenizer", file=sys.stderr)
        return 2
    try:
        raw = examples_of(open(args.text, encoding="utf-8").read(), 2000) if args.text else None
    except (OSError, UnicodeDecodeError) as e:
        print(f"error: cannot read --text {args.text}: {e}", file=sys.stderr)
        return 2
    docs = data.documents() if codec else []
    texts = [codec.decode(d.tolist()) for d, _ in docs] if codec else []
    checks = [check_labels(data), check_padding(data), check_range(data), check_separators(data, texts),
              check_repeats(data), check_ranks(rank0, rank1), check_val(data, val),
              check_inference_start(data, encode, first_words(docs, codec) if codec else DEFAULT_PROMPT),
              *check_tokenizer_text(data, texts, whitespace_probe(codec) if codec else {})]
    if raw is not None:
        checks.append(roundtrip_check(codec, raw))
    named = [c["suspected_bug"] for c in checks if c["suspected_bug"]]
    problems = [n for n in dict.fromkeys(named) if not is_deviation(n)]
    verdict = "BROKEN" if problems else "OK"
    B, T = batches[0].x.shape
    print(f"data {args.batches}: {len(batches)} batches of {B}x{T} read in {time.perf_counter() - t0:.1f} s"
          + (f", tokenizer {args.tokenizer}" if args.tokenizer else ", no tokenizer (text checks n/a)"))
    print(f"convention: {convention}; {SHIFT_NOTE[shifts]}" + ("" if args.model_shifts != "auto" else
                                                                  " (--model-shifts to say otherwise)"))
    print(format_table(checks))
    print("\n".join(picture(data, docs)))
    for n in problems:
        print(f"fix {n}: {PROBLEMS.get(n, {}).get('fix', '')}")
    print(json.dumps({"verdict": verdict, "problems": problems, "convention": convention}))
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(run_main(main))  # a bug of ours exits 70 with its traceback, never 1 (BROKEN)
