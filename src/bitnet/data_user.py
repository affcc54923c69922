"""Your own data loader inside the TinyStories experiment: `train_bitnet_tiny.py --data SPEC`.

UserDataTask is TinyStoriesTask with its training batches taken from the user's loader (read by
user_batches.RowStream). Everything else is ours: the tokenizer, the held-out text and its
bits-per-byte score, so a model trained on your batches and one trained on ours are scored on the
same text the same way. The ids your loader yields are our tokenizer's, unless --data-tokenizer
names yours (load_data_tokenizer): then the model has your vocabulary and our held-out text is
encoded with your tokenizer, still scored in bits per byte of that text, so the two runs compare.
Its checkpoints store the SPEC with the tokenizer; codec() rebuilds it for generate and evaluate.
"""
import os

import numpy as np
import torch

from .data_tinystories import TinyStoriesTask
from .taskkit import TextCodec
from .text_tokenizer import EOT, PAD, separator_id, tokenizer_from_identity

IGNORE_INDEX = -100


def load_data_tokenizer(path: str):
    """(tokenizers.Tokenizer, its JSON) of --data-tokenizer: a tokenizers JSON file or a transformers
    tokenizer folder (as check_data's --tokenizer); one-line ValueErrors for anything else."""
    from tokenizers import Tokenizer

    try:
        if os.path.isfile(path):
            tok = Tokenizer.from_file(path)
        elif os.path.isdir(path):
            from transformers import AutoTokenizer
            tok = getattr(AutoTokenizer.from_pretrained(path, local_files_only=True), "backend_tokenizer", None)
            if tok is None:
                raise ValueError("it has no fast tokenizer (tokenizer.json)")
        else:
            raise ValueError("no such file or folder")
    except Exception as e:  # noqa: BLE001 - tokenizers and transformers fail in many ways
        why = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise ValueError(f"--data-tokenizer {path}: cannot load a tokenizer ({why}); "
                         f"give a tokenizer.json file or a transformers tokenizer folder") from None
    if separator_id(tok) is None:
        raise ValueError(f"--data-tokenizer {path} has no end-of-document token ({EOT} or </s>): our held-out "
                         f"stories are scored with one between them; add it as a special token")
    return tok, tok.to_str()


class UserDataTask(TinyStoriesTask):
    """TinyStories with the training batches of the user's loader; evaluation, samples and the
    diagnosis as TinyStoriesTask's (our held-out text, in our tokenizer or --data-tokenizer's)."""

    name = "tinystories-user-data"

    def __init__(self, cfg, tokenizer_dir: str, train_source, val_source, cache_dir: str, rows, data_tokenizer=None):
        """`rows`: a user_batches.RowStream over the loader (its spec and kwargs name the run).
        `data_tokenizer`: load_data_tokenizer's (tokenizer, JSON) of the user's ids, None = ours;
        cfg.vocab_size is then its size (train_bitnet_tiny.py sets it)."""
        super().__init__(cfg, tokenizer_dir, train_source, val_source, cache_dir, tokenizer=data_tokenizer)
        self.rows, self.spec, self.kwargs = rows, rows.spec, rows.kwargs
        self.sources = {**self.sources, "train": f"--data {rows.spec}"}

    @classmethod
    def codec(cls, identity: dict) -> TextCodec:
        """Ours (TinyStoriesTask.codec) when the tokenizer has <|endoftext|>; a user's tokenizer
        without it gets no prefix and stops at its own end-of-document token."""
        tok = tokenizer_from_identity(identity)
        if tok.token_to_id(EOT) is not None:
            return super().codec(identity)
        return TextCodec(tok, separator_id(tok), pad_id=tok.token_to_id(PAD), corpus=cls.corpus)

    def check_first_batches(self) -> list[dict]:
        """check_data's checks on the loader's first batches, before any training (RowStream.check)."""
        return self.rows.check(self)

    def identity(self) -> dict:
        return {**super().identity(), "data": self.spec, "data_kwargs": self.kwargs}

    def get_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows step*batch_size onwards of the user's stream; rows of unequal length are padded
        (inputs with 0, labels with -100)."""
        rows = [self.rows.row(step * batch_size + i) for i in range(batch_size)]
        width = max(len(x) for x, _ in rows)
        x = np.zeros((batch_size, width), np.int64)
        y = np.full((batch_size, width), IGNORE_INDEX, np.int64)
        for i, (rx, ry) in enumerate(rows):
            x[i, :len(rx)], y[i, :len(ry)] = rx, ry
        if x.min() < 0 or ((y < 0) & (y != IGNORE_INDEX)).any():  # e.g. -1 as padding or as the ignored label
            raise ValueError(f"--data {self.spec} yields token id {min(x.min(), y[y != IGNORE_INDEX].min(initial=0))} "
                             f"at step {step}: ids must be >= 0 and ignored labels -100 (map your padding or "
                             f"ignore index to -100 in the loader)")
        if x.max() >= self.cfg.vocab_size or y.max() >= self.cfg.vocab_size:
            raise ValueError(f"--data {self.spec} yields token id {max(x.max(), y.max())} at step {step}, beyond the "
                             f"model's vocab_size {self.cfg.vocab_size}: name the tokenizer of your ids with "
                             f"--data-tokenizer PATH")
        return torch.from_numpy(x), torch.from_numpy(y)
