"""The user's loader read for training (`train_bitnet_tiny.py --data SPEC`, data_user.UserDataTask).

A SPEC names a factory of batches, as for `python -m bitnet.check_data` (--data-kwargs JSON goes
to it). Batches come in any convention check_data reads (input_ids, (x, y), dicts) and become ours:
inputs x and next-token labels y, -100 where no loss is taken. A model that shifts (input_ids,
transformers' labels) sees x[:, :-1] and learns labels[:, 1:]; a loader that shifted ((x, y),
targets) is taken as it is: a fault in the labels trains exactly as it would in your code.
"""
import json
import os

import numpy as np

from .check_data import first_words, load, model_shifts_by_default, open_loader
from .diagnose.batches import IGNORE_INDEX, Data, DataError, normalise
from .diagnose.data_checks import (check_inference_start, check_labels, check_padding, check_range, check_repeats,
                                   check_separators, check_tokenizer_text)
from .diagnose.tokenizer_checks import from_tokenizers, whitespace_probe
from .spec import SpecError, resolve_spec, split_spec

HEAD_ROWS = 4096  # rows kept in memory: evaluation, the diagnosis and the milestones re-read the first batches


def absolute_spec(spec: str) -> str:
    """A file SPEC made absolute, so a checkpoint finds the loader from any directory."""
    target, name = split_spec(spec)
    return f"{os.path.abspath(target)}:{name}" if target.endswith(".py") or os.sep in target else spec


def parse_kwargs(text: str) -> dict:
    try:
        kwargs = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"--data-kwargs is not valid JSON ({e}); pass an object like '{{\"batch_size\": 8}}'") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--data-kwargs must be a JSON object, got {text!r}")
    return kwargs


def one_line(e: Exception) -> ValueError:
    """check_data's error for a loader, in the train script's words."""
    return ValueError(str(e).replace("with --kwargs JSON", "with --data-kwargs JSON"))


def open_user_data(spec: str, kwargs: dict, paths, max_batches: int = 50):
    """(batches, convention) of the first batches of the user's loader: a bad SPEC, a factory that
    fails or batches that cannot be read raise one-line ValueErrors."""
    try:
        return load(spec, paths, kwargs, max_batches, "--data")
    except (SpecError, DataError) as e:
        raise one_line(e) from None


def data_checks_of(task, batches, convention: str) -> list[dict]:
    """check_data's checks of one loader on its first batches, with our tokenizer and our inference
    encoding (what generate puts first): [{name, passed, evidence, suspected_bug}]."""
    codec = from_tokenizers(task.tok)
    data = Data(batches, convention, model_shifts_by_default(convention), codec, IGNORE_INDEX, task.cfg.vocab_size)
    docs = data.documents()
    texts = [codec.decode(d.tolist()) for d, _ in docs]
    encode = type(task).codec(task.identity()).encode
    return [check_labels(data), check_padding(data), check_range(data), check_separators(data, texts),
            check_repeats(data), check_inference_start(data, encode, first_words(docs, codec)),
            *check_tokenizer_text(data, texts, whitespace_probe(codec))]


def our_rows(x: np.ndarray, y: np.ndarray, model_shifts: bool, ignore_index: int, context: int):
    """One batch of the user's as rows of ours: (x, y) with y the label of the next token, -100 = none."""
    if model_shifts:  # the labels sit at their own input's position: the loss shifts them
        x, y = x[:, :-1], y[:, 1:]
    y = np.where(y == ignore_index, IGNORE_INDEX, y)
    return [(x[i, :context], y[i, :context]) for i in range(len(x))]


class RowStream:
    """The user's loader as numbered rows of ours. The first HEAD_ROWS are kept (evaluation, the
    diagnosis and the milestones re-read the first batches); later ones are read forward. Asking
    for an earlier row (a resume) reopens the loader and reads up to it; running out starts the
    next epoch. A deterministic loader therefore gives row i the same at every call."""

    def __init__(self, spec: str, kwargs: dict, paths, context: int):
        self.spec, self.kwargs, self.paths, self.context = absolute_spec(spec), kwargs, list(paths), context
        self.head, self.pending, self.it, self.pos, self.epoch_start = [], [], None, 0, 0

    def check(self, task, max_batches: int = 50) -> list[dict]:
        """check_data's checks on the first batches (data_checks_of); a bad SPEC or a loader that cannot
        be read fails here in one line."""
        return data_checks_of(task, *open_user_data(self.spec, self.kwargs, self.paths, max_batches))

    def reopen(self, pos: int = 0):
        """The loader from its start; `pos` numbers its first row (0, or the row after the last epoch's)."""
        try:
            loader = open_loader(resolve_spec(self.spec, self.paths), self.kwargs, f"--data {self.spec}")
        except (SpecError, DataError) as e:
            raise one_line(e) from None
        self.it, self.pending, self.pos, self.epoch_start = iter(loader), [], pos, pos

    def next_row(self):
        while not self.pending:
            try:
                item = next(self.it)
            except StopIteration:
                if self.pos == self.epoch_start:
                    raise ValueError(f"--data {self.spec} yielded no batches") from None
                self.reopen(self.pos)  # the next epoch
                continue
            except Exception as e:  # noqa: BLE001 - the user's loader fails in any way: one line
                raise ValueError(f"--data {self.spec} raised {type(e).__name__} at row {self.pos}: "
                                 f"{str(e).strip()[:200]}") from None
            try:
                b, convention = normalise(item, self.pos)
            except DataError as e:
                raise ValueError(f"--data {self.spec}: {e}") from None
            self.pending = our_rows(b.x, b.y, model_shifts_by_default(convention), IGNORE_INDEX, self.context)
        self.pos += 1
        return self.pending.pop(0)

    def row(self, i: int):
        if i < len(self.head):
            return self.head[i]
        if self.it is None or i < self.pos:
            self.reopen()
        while True:
            r = self.next_row()
            if self.pos - 1 == len(self.head) and len(self.head) < HEAD_ROWS:
                self.head.append(r)
            if self.pos - 1 == i:
                return r
