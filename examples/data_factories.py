"""Our own three loaders as check_data factories: what `--batches SPEC` expects of yours.

    python -m bitnet.check_data --batches examples/data_factories.py:arithmetic \\
        --val-batches examples/data_factories.py:arithmetic_val --tokenizer examples/data_factories.py:arithmetic_tokenizer
    python -m bitnet.check_data --batches examples/data_factories.py:tinystories \\
        --val-batches examples/data_factories.py:tinystories_val --encode examples/data_factories.py:tinystories_prompt \\
        --tokenizer runs/tinystories/tokenizer --kwargs '{"tokenizer_dir": "runs/tinystories/tokenizer"}'
    python -m bitnet.check_data --batches examples/data_factories.py:fineweb --val-batches examples/data_factories.py:fineweb_val \\
        --tokenizer runs/tinystories/tokenizer \\
        --kwargs '{"tokenizer_dir": "runs/tinystories/tokenizer", "data_files": ["docs.jsonl"]}'

Each factory yields the (x, y) batches the trainer trains on, for one process of `world_size`
(check_data calls it for ranks 0 and 1 of 2): TinyStories and arithmetic cut the global batch by
rank as bitnet.distributed.rank_batch does; FineWeb-Edu reads this process's own stream.
"""
import itertools
from types import SimpleNamespace

import numpy as np
import torch

from bitnet.config_tiny import BitNetConfigArithmetic
from bitnet.arithmetic_codec import CharTokenizer
from bitnet.arithmetic_problems import encode_problems
from bitnet.data_arithmetic import ArithmeticTask
from bitnet.data_fineweb import DocSource, FineWebTask
from bitnet.data_tinystories import EOT, TinyStoriesTask, load_tokenizer

SHARED = "../shared/data/tinystories"


def rank_rows(get_batch, batch_size: int, rank: int, world_size: int):
    """The rows of each step's global batch that belong to `rank`, step after step."""
    for step in itertools.count():
        x, y = get_batch(step, batch_size * world_size)
        yield x[rank * batch_size:(rank + 1) * batch_size], y[rank * batch_size:(rank + 1) * batch_size]


def windows(tokens, context: int, batch_size: int):
    """A validation stream as consecutive (x, y) windows, as evaluation reads it."""
    w = torch.from_numpy(np.asarray(tokens[: len(tokens) // (context + 1) * (context + 1)], dtype=np.int64))
    w = w.view(-1, context + 1)
    for i in range(0, len(w), batch_size):
        yield w[i:i + batch_size, :-1], w[i:i + batch_size, 1:]


# --- arithmetic

def arithmetic(batch_size: int = 8, rank: int = 0, world_size: int = 1, **_):
    task = ArithmeticTask(BitNetConfigArithmetic())
    return rank_rows(task.get_batch, batch_size, rank, world_size)


def arithmetic_val(batch_size: int = 8, **_):
    """The held-out '+' and '-' problems ('*' and '/' are evaluated on the times tables they train on)."""
    task = ArithmeticTask(BitNetConfigArithmetic())
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        yield encode_problems(task.domain.sample(batch_size, g, "heldout", part="val"), task.tok, domain=task.domain,
                              length=task.domain.max_length())


def arithmetic_tokenizer():
    return CharTokenizer()


# --- TinyStories

def tinystories_task(tokenizer_dir: str, data_dir: str = SHARED, context: int = 256, cache_dir: str = "data_cache"):
    tok, _ = load_tokenizer(tokenizer_dir)
    cfg = SimpleNamespace(seed=0, max_position_embeddings=context, vocab_size=tok.get_vocab_size())
    return TinyStoriesTask(cfg, tokenizer_dir, f"{data_dir}/train.txt", f"{data_dir}/valid.txt", cache_dir)


def tinystories(tokenizer_dir: str, batch_size: int = 8, rank: int = 0, world_size: int = 1, **kw):
    kw = {k: v for k, v in kw.items() if k in ("data_dir", "context", "cache_dir")}
    return rank_rows(tinystories_task(tokenizer_dir, **kw).get_batch, batch_size, rank, world_size)


def tinystories_val(tokenizer_dir: str, batch_size: int = 8, **kw):
    kw = {k: v for k, v in kw.items() if k in ("data_dir", "context", "cache_dir")}
    task = tinystories_task(tokenizer_dir, **kw)
    return windows(task.val_tokens, task.cfg.max_position_embeddings, batch_size)


def tinystories_prompt(text: str, tokenizer_dir: str) -> list[int]:
    """How generation encodes a prompt (TinyStoriesTask.generate_stories): <|endoftext|> first."""
    tok, _ = load_tokenizer(tokenizer_dir)
    return [tok.token_to_id(EOT)] + tok.encode(text).ids


# --- FineWeb-Edu (local jsonl/parquet files with a "text" field)

def fineweb_task(tokenizer_dir: str, data_files, context: int = 256, val_docs: int = 50):
    tok, _ = load_tokenizer(tokenizer_dir)
    cfg = SimpleNamespace(seed=0, max_position_embeddings=context, vocab_size=tok.get_vocab_size())
    return FineWebTask(cfg, tokenizer_dir, DocSource(tuple(data_files)), val_docs)


def fineweb(tokenizer_dir: str, data_files, batch_size: int = 8, rank: int = 0, world_size: int = 1, **kw):
    task = fineweb_task(tokenizer_dir, data_files, **{k: v for k, v in kw.items() if k in ("context", "val_docs")})
    for step in itertools.count():
        try:
            yield task.get_rank_batch(step, batch_size, rank, world_size)
        except ValueError as e:
            if "ran out of documents" not in str(e):
                raise
            return  # the local files are read to their end: so is this loader


def fineweb_val(tokenizer_dir: str, data_files, batch_size: int = 8, **kw):
    task = fineweb_task(tokenizer_dir, data_files, **{k: v for k, v in kw.items() if k in ("context", "val_docs")})
    return windows(task.val_tokens, task.cfg.max_position_embeddings, batch_size)
