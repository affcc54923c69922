"""Checks of a user's training batches, for `python -m bitnet.check_data` (the batches are read
and normalised by batches.py). Each check returns {"name", "passed", "evidence", "suspected_bug"};
evidence["skipped"] says why a check could not run (no tokenizer, no validation batches, a factory
without rank).
"""
import collections
import hashlib
import re

import numpy as np

from .batches import Batch, Data, name, token_counts

# a document end run into the next start: "happy.Once", "day!\"The" (lower-case letter first, so "U.S." is not one)
RUN_TOGETHER = re.compile(r"[a-z][.!?][\"'\u201d]?[A-Z][a-z]")


def result(name: str, passed: bool, evidence: dict, problem: str | None = None) -> dict:
    return {"name": name, "passed": passed, "evidence": evidence, "suspected_bug": None if passed else problem}


def skipped(name: str, why: str) -> dict:
    return result(name, True, {"skipped": why})


def check_labels(data: Data) -> dict:
    """Labels must be the inputs (a model that shifts) or the inputs shifted by one (one that does not)."""
    if data.convention == "input_ids":
        return result("labels_aligned", True, {"note": "labels are the inputs; the loss shifts"})
    want = 0 if data.model_shifts else 1
    matches, counted = collections.Counter(), 0
    for b, pad in zip(data.batches, data.pad):
        use = (b.y != data.ignore_index) & ~data.label_padding(b, pad)
        counted += int(use.sum())
        for s in (-1, 0, 1, 2):
            if abs(s) >= b.x.shape[1]:
                continue
            lo, hi = max(0, -s), b.x.shape[1] - max(0, s)
            matches[s] += int(((b.y[:, lo:hi] == b.x[:, lo + s:hi + s]) & use[:, lo:hi]).sum())
    if counted == 0:
        return result("labels_aligned", False, {"finding": f"every label is the ignore index {data.ignore_index}: "
                                                           f"nothing is trained on"}, "labels_misaligned")
    share = {s: matches[s] / counted for s in (-1, 0, 1, 2)}
    best = max(share, key=share.get)
    evidence = {"labelled_positions": counted, "model_shifts": data.model_shifts,
                **{f"label_equals_input_at_t{s:+d}": round(v, 4) for s, v in share.items()}}
    passed = share[want] >= 0.5 and share[want] >= share[best]
    if passed:
        return result("labels_aligned", True, evidence)
    if want == 1 and best == 0:
        evidence["finding"] = (f"{share[0]:.0%} of labels equal the input at the same position ({share[1]:.0%} the next "
                               f"one): labels = input_ids, for a model that does not shift")
        return result("labels_aligned", False, evidence, "unshifted_labels")
    where = {-1: "the previous input", 0: "the input itself", 1: "the next input", 2: "the input two ahead"}
    evidence["finding"] = (f"labels match {where[best]} ({share[best]:.0%}), not {where[want]} ({share[want]:.0%})"
                           + (": shifted by the loader and again by the model" if want == 0 and best == 1 else ""))
    return result("labels_aligned", False, evidence, "labels_misaligned")


def check_padding(data: Data) -> dict:
    if data.pad_source is None:
        return skipped("padding_ignored", "no attention_mask and no tokenizer pad id: padding cannot be told apart")
    n_pad = sum(int(p.sum()) for p in data.pad)
    bad = labelled = 0
    for b, pad in zip(data.batches, data.pad):
        lab = b.y != data.ignore_index
        labelled += int(lab.sum())
        bad += int((lab & data.label_padding(b, pad)).sum())
    evidence = {"pad_from": data.pad_source, "pad_share": round(n_pad / data.n_positions, 4),
                "padded_labels": bad, "labelled_positions": labelled, "ignore_index": data.ignore_index}
    passed = bad <= 0.001 * max(labelled, 1)
    if not passed:
        evidence["finding"] = (f"{bad:,} labels ({bad / labelled:.1%} of the loss) sit on padding: set them to "
                               f"{data.ignore_index}")
    return result("padding_ignored", passed, evidence, "padding_in_loss")


def check_range(data: Data) -> dict:
    lo = min(int(b.x.min()) for b in data.batches)
    hi = max(int(b.x.max()) for b in data.batches)
    labels = [b.y[b.y != data.ignore_index] for b in data.batches]
    lab_lo = min((int(v.min()) for v in labels if v.size), default=0)
    lab_hi = max((int(v.max()) for v in labels if v.size), default=0)
    evidence = {"input_ids": [lo, hi], "label_ids": [lab_lo, lab_hi], "vocab_size": data.vocab_size}
    bad = []
    if min(lo, lab_lo) < 0:
        bad.append(f"negative ids (smallest {min(lo, lab_lo)}; the ignore index is {data.ignore_index}: "
                   f"pass --ignore-index {min(lo, lab_lo)} if your loss ignores that one)")
    if data.vocab_size is not None and max(hi, lab_hi) >= data.vocab_size:
        n = sum(int((b.x >= data.vocab_size).sum()) for b in data.batches)
        bad.append(f"{n:,} input ids at or above the vocabulary size {data.vocab_size} (largest {max(hi, lab_hi)})")
    if data.vocab_size is None:
        evidence["note"] = "no tokenizer or --vocab-size: only negative ids checked"
    if bad:
        evidence["finding"] = "; ".join(bad)
    return result("tokens_in_range", not bad, evidence, "token_out_of_range")


def check_separators(data: Data, texts: list[str]) -> dict:
    if data.codec is None:
        return skipped("documents_separated", "needs --tokenizer to see documents")
    counts = token_counts(data)
    seen = {i: int(counts[i]) for i in data.separators if i < len(counts) and counts[i]}
    joined = [t[max(0, m.start() - 20):m.end() + 12] for t in texts for m in RUN_TOGETHER.finditer(t)]
    evidence = {"separator_tokens": {name(data, i): n for i, n in seen.items()}, "run_together": len(joined),
                "rows": len(data.rows), "examples": joined[:5]}
    passed = bool(seen) or len(joined) < max(3, len(data.rows) // 100)
    if not passed:
        evidence["finding"] = (f"{len(joined)} places where one document's end runs into the next one's start "
                               f"(e.g. {joined[0]!r}) and no separator, BOS or EOS token in {len(data.rows):,} rows")
    return result("documents_separated", passed, evidence, "no_document_separator")


def row_key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(row.tobytes(), digest_size=8).digest()


def check_repeats(data: Data, long_row: int = 32) -> dict:
    seen, repeat = {}, None
    for i, b in enumerate(data.batches):
        k = row_key(np.concatenate([b.x.ravel(), b.y.ravel()]))
        if k in seen and repeat is None:
            repeat = (seen[k], i)
        seen.setdefault(k, i)
    keys = [row_key(r) for r in data.rows if len(r) >= long_row]
    dup = len(keys) - len(set(keys))
    evidence = {"batches": len(data.batches), "long_rows": len(keys), "duplicate_long_rows": dup}
    problems = []
    if repeat:
        problems.append(f"batch {repeat[1]} is identical to batch {repeat[0]}")
    if dup >= 2 and dup >= 0.01 * len(keys):
        problems.append(f"{dup} of {len(keys)} rows of >= {long_row} tokens repeat an earlier row")
    if problems:
        evidence["finding"] = "; ".join(problems) + ": the loader restarts or cycles its data"
    return result("no_repeated_batches", not problems, evidence, "repeated_batches")


def check_ranks(rank0: list[Batch] | None, rank1: list[Batch] | None) -> dict:
    if rank0 is None:
        return skipped("ranks_disjoint", "the factory takes no rank and world_size")
    same = total = 0
    for a, b in zip(rank0, rank1):
        n = min(len(a.x), len(b.x))
        total += n
        if a.x.shape == b.x.shape:
            same += int((a.x == b.x).all(axis=1)[:n].sum())
    share = same / max(total, 1)
    evidence = {"rows_compared": total, "same_rows": same}
    passed = share < 0.5
    if not passed:
        evidence["finding"] = (f"rank 0 and rank 1 of 2 yield the same row at {share:.0%} of {total} positions: "
                               f"every process trains on the same data")
    return result("ranks_disjoint", passed, evidence, "ranks_share_data")


def window_hashes(row: np.ndarray, n: int) -> np.ndarray:
    """A random linear hash of every n-token window of a row (uint64 arithmetic wraps)."""
    weights = np.random.default_rng(0).integers(1, 2**62, n, dtype=np.int64) | 1
    windows = np.lib.stride_tricks.sliding_window_view(row, n)
    return (windows * weights).sum(axis=1)


def check_val(data: Data, val: Data | None, threshold: float = 0.1) -> dict:
    if val is None:
        return skipped("val_apart", "no --val-batches")
    T = max(b.x.shape[1] for b in data.batches)
    n = min(64, max(8, T // 4))
    train = np.unique(np.concatenate([window_hashes(r, n) for r in data.rows if len(r) >= n] or [np.zeros(0, np.int64)]))
    whole = {row_key(r) for r in data.rows}
    long_rows = [r for r in val.rows if len(r) >= 2 * n]
    hits = sum(row_key(r) in whole for r in val.rows if 0 < len(r) < 2 * n)
    if long_rows:  # one isin over every window of every long row: isin sorts its inputs on each call
        hashes = [window_hashes(r, n) for r in long_rows]
        owner = np.repeat(np.arange(len(hashes)), [len(h) for h in hashes])
        hits += len(np.unique(owner[np.isin(np.concatenate(hashes), train)]))
    share = hits / max(len(val.rows), 1)
    evidence = {"val_rows": len(val.rows), "val_rows_in_train": hits, "ngram": n}
    passed = not (share >= threshold and hits >= 2)
    if not passed:
        evidence["finding"] = (f"{hits} of {len(val.rows)} validation rows ({share:.0%}) share a {n}-token run with "
                               f"the training batches: validation measures memory")
    return result("val_apart", passed, evidence, "val_in_train")


def check_inference_start(data: Data, encode, prompt: str) -> dict:
    """The inference encoding's first token must open documents in training too, and a BOS that opens
    training documents must open inference prompts."""
    if data.codec is None and encode is None:
        return skipped("inference_start", "needs --tokenizer or --encode")
    try:
        ids = [int(i) for i in (encode or data.codec.encode_for_inference)(prompt)]
    except Exception as e:  # noqa: BLE001
        return skipped("inference_start", f"the inference encoding failed on {prompt!r}: {type(e).__name__}")
    if not ids:
        return skipped("inference_start", f"the inference encoding of {prompt!r} is empty")
    counts = token_counts(data)
    first = ids[0]
    special = data.codec.special_ids if data.codec else set()
    in_train = int(counts[first]) if first < len(counts) else 0
    evidence = {"prompt": prompt, "inference_ids": ids[:8], "first": name(data, first), "first_in_training": in_train}
    if first in special and in_train == 0:
        evidence["finding"] = (f"inference puts {name(data, first)} first, and no training row holds it: the model "
                               f"never saw a document start after it")
        return result("inference_start", False, evidence, "train_inference_mismatch")
    bos = data.codec.bos_id if data.codec else None
    if first not in special and bos is not None and bos != data.codec.eos_id and bos < len(counts) and counts[bos]:
        evidence["finding"] = (f"training rows open documents with {name(data, bos)} ({int(counts[bos]):,} times), "
                               f"inference prompts do not start with it")
        return result("inference_start", False, evidence, "train_inference_mismatch")
    return result("inference_start", True, evidence)


def check_tokenizer_text(data: Data, texts: list[str], probe: dict) -> list[dict]:
    """Tokenizer faults seen in the decoded batches: whitespace the tokens cannot hold, spaces decode adds,
    unknown tokens."""
    if data.codec is None:
        return [skipped("tokenizer_on_batches", "needs --tokenizer")]
    chars = sum(len(t) for t in texts)
    newlines = sum(t.count("\n") for t in texts)
    marks = sum(len(re.findall(r"[,.!?]", t)) for t in texts)
    spaced = sum(len(re.findall(r"\s[,.!?]", t)) for t in texts)
    out = []
    ev = {"decoded_chars": chars, "newlines": newlines, "tokenizer_keeps_newline": probe.get("keeps_newline")}
    lost = probe.get("keeps_newline") is False and newlines == 0 and chars >= 2000
    if lost:
        ev["finding"] = (f"no newline in {chars:,} decoded characters and the tokenizer turns 'one\\ntwo' into "
                         f"text without one: line and paragraph breaks are gone from the training text")
    out.append(result("whitespace_kept", not lost, ev, "whitespace_lost"))
    ev = {"punctuation": marks, "space_before_punctuation": spaced, "tokenizer_adds_spaces": probe.get("adds_spaces")}
    adds = probe.get("adds_spaces") is True and marks >= 20 and spaced >= 0.3 * marks
    if adds:
        ev["finding"] = (f"{spaced / marks:.0%} of ',.!?' in the decoded batches follow a space, and decode('yes, it "
                         f"is.') adds one: the tokenizer's decode joins pieces with spaces")
    out.append(result("decode_spacing", not adds, ev, "decode_adds_spaces"))
    unk = data.codec.unk_id
    counts = token_counts(data)
    n_unk = int(counts[unk]) if unk is not None and unk < len(counts) else 0
    ev = {"unk_tokens": n_unk, "unk_share": round(n_unk / max(int(counts.sum()), 1), 5)}
    if n_unk:
        ev["finding"] = f"{n_unk:,} unknown tokens ({name(data, unk)}) in the batches: that text is lost"
    out.append(result("no_unk_tokens", not n_unk, ev, "unk_tokens"))
    return out
