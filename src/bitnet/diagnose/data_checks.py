"""Checks of a user's training batches, for `python -m bitnet.check_data`.

A loader yields batches in one of three conventions, normalised here to Batch(x, y, mask):
  "input_ids"  a LongTensor [B, T]; the labels are the inputs, the loss shifts
  "(x, y)"     pairs; y is x shifted by one (nanoGPT, llama2.c: the model does not shift); a second
               element of only 0s and 1s is an attention mask: "(input_ids, attention_mask)"
  "dict"       {"input_ids", "labels"/"targets", "attention_mask"}; labels equal input_ids and the
               model shifts (transformers), unless told otherwise (--model-shifts no)
Each check returns {"name", "passed", "evidence", "suspected_bug"}; evidence["skipped"] says why a
check could not run (no tokenizer, no validation batches, a factory without rank).
"""
import collections
import hashlib
import re
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
INPUT_KEYS = ("input_ids", "inputs", "x", "tokens", "idx")
LABEL_KEYS = ("labels", "targets", "target", "y")
MASK_KEYS = ("attention_mask", "mask")
# a document end run into the next start: "happy.Once", "day!\"The" (lower-case letter first, so "U.S." is not one)
RUN_TOGETHER = re.compile(r"[a-z][.!?][\"'\u201d]?[A-Z][a-z]")


class DataError(ValueError):
    """The batches cannot be read or understood: exit 2."""


@dataclass
class Batch:
    x: np.ndarray                 # [B, T] int64 input ids
    y: np.ndarray                 # [B, T] int64 labels (the inputs themselves for "input_ids")
    mask: np.ndarray | None       # [B, T] attention mask, 1 = real token


def result(name: str, passed: bool, evidence: dict, problem: str | None = None) -> dict:
    return {"name": name, "passed": passed, "evidence": evidence, "suspected_bug": None if passed else problem}


def skipped(name: str, why: str) -> dict:
    return result(name, True, {"skipped": why})


def as_ids(value, what: str) -> np.ndarray:
    try:
        import torch
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        a = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - anything a loader yields
        raise DataError(f"{what} is not an array of token ids ({type(e).__name__})") from None
    if a.dtype.kind not in "iu" or a.ndim not in (1, 2):
        raise DataError(f"{what} must be integer token ids of shape [B, T] or [T], got {a.dtype} {list(a.shape)}")
    return a.astype(np.int64).reshape(-1, a.shape[-1])


def normalise(item, index: int) -> tuple[Batch, str]:
    """One yielded item as a Batch and its convention name."""
    what = f"batch {index}"
    if hasattr(item, "keys") and hasattr(item, "__getitem__"):
        keys = list(item.keys())
        xk = next((k for k in INPUT_KEYS if k in keys), None)
        if xk is None:
            raise DataError(f"{what} is a dict without input ids (keys {keys}); expected one of {list(INPUT_KEYS)}")
        yk = next((k for k in LABEL_KEYS if k in keys), None)
        mk = next((k for k in MASK_KEYS if k in keys), None)
        x = as_ids(item[xk], f"{what}[{xk!r}]")
        y = as_ids(item[yk], f"{what}[{yk!r}]") if yk else x
        mask = as_ids(item[mk], f"{what}[{mk!r}]") if mk else None
        return Batch(x, y, mask), "dict(" + ", ".join(k for k in (xk, yk, mk) if k) + ")"
    if isinstance(item, (tuple, list)) and len(item) in (2, 3) and not isinstance(item[0], (int, np.integer)):
        x, y = as_ids(item[0], f"{what}[0]"), as_ids(item[1], f"{what}[1]")
        if len(item) == 2 and y.shape == x.shape and y.min() >= 0 and y.max() <= 1 < x.max():
            return Batch(x, x, y), "(input_ids, attention_mask)"  # a mask, not labels
        mask = as_ids(item[2], f"{what}[2]") if len(item) == 3 else None
        return Batch(x, y, mask), "(x, y)"
    x = as_ids(item, what)
    return Batch(x, x, None), "input_ids"


def read_batches(iterable, max_batches: int, label: str = "the loader",
                 max_tokens: int = 2_000_000) -> tuple[list[Batch], str]:
    """Up to max_batches batches and about max_tokens input tokens (a streaming loader is never read to
    its end; big batches do not make the checks slow)."""
    try:
        it = iter(iterable)
    except TypeError:
        raise DataError(f"{label} returned a {type(iterable).__name__}, which is not iterable; the factory must "
                        f"return an iterable of batches") from None
    batches, convention, n_tokens = [], None, 0
    while len(batches) < max_batches and n_tokens < max_tokens:
        try:
            item = next(it)
        except StopIteration:
            break
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's loader fails in any way: one line
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"{label} raised {type(e).__name__} after {len(batches)} batch(es): {text}") from None
        batch, conv = normalise(item, len(batches))
        if batch.y.shape != batch.x.shape or (batch.mask is not None and batch.mask.shape != batch.x.shape):
            raise DataError(f"batch {len(batches)} of {label}: labels {list(batch.y.shape)} or mask do not match "
                            f"the inputs {list(batch.x.shape)}")
        if convention not in (None, conv):
            raise DataError(f"{label} mixes conventions: {convention} then {conv} at batch {len(batches)}")
        convention = conv
        batches.append(batch)
        n_tokens += batch.x.size
    if not batches:
        raise DataError(f"{label} yielded no batches")
    return batches, convention


# ----------------------------------------------------------------------------- what every check needs

class Data:
    """The batches read plus what the checks derive from them: padding, labelled positions, documents."""

    def __init__(self, batches: list[Batch], convention: str, model_shifts: bool, codec=None,
                 ignore_index: int = IGNORE_INDEX, vocab_size: int | None = None):
        self.batches, self.convention, self.model_shifts = batches, convention, model_shifts
        self.codec, self.ignore_index = codec, ignore_index
        self.vocab_size = vocab_size or (codec.vocab_size if codec else None)
        self.pad_source = self._pad_source()
        self.pad = [self.input_padding(b) for b in batches]
        self.separators = set()
        if codec is not None:
            self.separators = codec.special_ids - {codec.unk_id} - ({codec.pad_id} if self.pad_source == "pad id" else set())
        self.rows = [r[~p] for b, pad in zip(batches, self.pad) for r, p in zip(b.x, pad)]  # content of each row
        self.n_positions = sum(b.x.size for b in batches)

    def _pad_source(self) -> str | None:
        c = self.codec
        if any(b.mask is not None for b in self.batches):
            return "attention_mask"
        if c is not None and c.pad_id is not None:
            return "pad id" if c.pad_id not in (c.bos_id, c.eos_id) else "trailing pad/eos run"
        return None

    def input_padding(self, b: Batch) -> np.ndarray:
        if b.mask is not None:
            return b.mask == 0
        pad = np.zeros(b.x.shape, dtype=bool)
        if self.pad_source == "pad id":
            pad = b.x == self.codec.pad_id
        elif self.pad_source == "trailing pad/eos run":  # pad == eos: only a run of it closing a row is padding
            is_pad = b.x == self.codec.pad_id
            run_start = b.x.shape[1] - np.argmax(~is_pad[:, ::-1], axis=1)  # first index of the closing run
            run_start[is_pad.all(axis=1)] = 0
            pad = np.arange(b.x.shape[1])[None, :] > run_start[:, None]  # the run's first token is the real eos
        return pad

    def label_padding(self, b: Batch, pad: np.ndarray) -> np.ndarray:
        """Label positions trained on padding: a padded position when the model shifts; when the loader
        shifted, a label predicted from a padded input or naming the pad token."""
        if self.model_shifts:
            return pad
        if self.pad_source == "pad id":
            return pad | (b.y == self.codec.pad_id)
        return pad

    def documents(self) -> list[tuple[np.ndarray, bool]]:
        """(tokens, complete) for each run of tokens between separators; complete when bounded on both
        sides by a separator (or closed by padding)."""
        docs = []
        for b, pad in zip(self.batches, self.pad):
            for row, p in zip(b.x, pad):
                content = row[~p]
                cut = np.flatnonzero(np.isin(content, list(self.separators))) if self.separators else np.array([], int)
                edges = [-1, *cut.tolist(), len(content)]
                for k in range(len(edges) - 1):
                    seg = content[edges[k] + 1: edges[k + 1]]
                    if len(seg):
                        padded = bool(p.any())  # a padded row holds whole documents: its start opens one
                        closed = k + 1 < len(edges) - 1 or padded
                        docs.append((seg, (k > 0 or padded) and closed))
        return docs


def token_counts(data: Data) -> np.ndarray:
    ids = np.concatenate([r for r in data.rows if len(r)]) if data.rows else np.zeros(0, np.int64)
    ids = ids[ids >= 0]
    return np.bincount(ids) if len(ids) else np.zeros(1, np.int64)


def name(data: Data, i: int) -> str:
    return data.codec.name_of(int(i)) if data.codec is not None else f"#{int(i)}"


# ----------------------------------------------------------------------------- the checks

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
