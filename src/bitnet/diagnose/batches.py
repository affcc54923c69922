"""A user's training batches, read and normalised for the checks in data_checks.py.

A loader yields batches in one of three conventions, normalised here to Batch(x, y, mask):
  "input_ids"  a LongTensor [B, T]; the labels are the inputs, the loss shifts
  "(x, y)"     pairs; y is x shifted by one (nanoGPT, llama2.c: the model does not shift); a second
               element of only 0s and 1s is an attention mask: "(input_ids, attention_mask)"
  "dict"       {"input_ids", "labels"/"targets", "attention_mask"}; labels equal input_ids and the
               model shifts (transformers), unless told otherwise (--model-shifts no)
"""
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
INPUT_KEYS = ("input_ids", "inputs", "x", "tokens", "idx")
LABEL_KEYS = ("labels", "targets", "target", "y")
MASK_KEYS = ("attention_mask", "mask")


class DataError(ValueError):
    """The batches cannot be read or understood: exit 2."""


@dataclass
class Batch:
    x: np.ndarray                 # [B, T] int64 input ids
    y: np.ndarray                 # [B, T] int64 labels (the inputs themselves for "input_ids")
    mask: np.ndarray | None       # [B, T] attention mask, 1 = real token


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
