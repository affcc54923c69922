"""Your own data loader inside the TinyStories experiment: `train_bitnet_tiny.py --data SPEC`.

UserDataTask is TinyStoriesTask with its training batches taken from the user's loader (read by
user_batches.RowStream). Everything else is ours: the tokenizer, the held-out text and its
bits-per-byte score, so a model trained on your batches and one trained on ours are scored on the
same text the same way. The ids your loader yields must be our tokenizer's (check_data's
token_out_of_range says so when they are not). Its checkpoints store the SPEC with our tokenizer;
their codec is TinyStories' (tasks.codec_for).
"""
import numpy as np
import torch

from .data_tinystories import TinyStoriesTask

IGNORE_INDEX = -100


class UserDataTask(TinyStoriesTask):
    """TinyStories with the training batches of the user's loader; evaluation, samples and the
    diagnosis as TinyStoriesTask's (our tokenizer, our held-out text)."""

    name = "tinystories-user-data"

    def __init__(self, cfg, tokenizer_dir: str, train_source, val_source, cache_dir: str, rows):
        """`rows`: a user_batches.RowStream over the loader (its spec and kwargs name the run)."""
        super().__init__(cfg, tokenizer_dir, train_source, val_source, cache_dir)
        self.rows, self.spec, self.kwargs = rows, rows.spec, rows.kwargs
        self.sources = {**self.sources, "train": f"--data {rows.spec}"}

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
        if x.max() >= self.cfg.vocab_size or y.max() >= self.cfg.vocab_size:
            raise ValueError(f"--data {self.spec} yields token id {max(x.max(), y.max())} at step {step}, beyond the "
                             f"model's vocab_size {self.cfg.vocab_size}: your batches must use our tokenizer's ids")
        return torch.from_numpy(x), torch.from_numpy(y)
