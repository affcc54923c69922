"""FineWeb-Edu for the 95m and 200m presets: documents streamed with `datasets`, packed into one
token stream per process, resumable mid-stream.

Source. `HuggingFaceFW/fineweb-edu`, config `sample-10BT` (~10B GPT-2 tokens, one `train` split),
streamed from the hub; or local jsonl / parquet files with the same schema (a `text` field per
row; --text-field names another). Nothing is shuffled: the stream is read in file order.

Validation. The first `val_docs` documents of the whole source. Training skips them on every
process (matched by a hash of the text), so no validation document is ever trained on.

Sharding and packing. Each process reads its own part (datasets.distributed.split_dataset_by_node:
whole files when their count divides by the world size, every world_size-th row otherwise) and
packs it as `<|endoftext|> doc <|endoftext|> doc ...`; a batch of r rows takes r*T tokens, each
row's targets are its inputs shifted by one. Nothing is padded or thrown away.

Resume. A process's position is the dataset's own state_dict() (shard and row) plus the tokens
read but not yet trained on. The trainer gathers every process's position into the checkpoint
(distributed.gather_task_state) and hands each its own back on --resume.
"""
import atexit
import gc
import hashlib
import itertools
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .data_tinystories import TinyStoriesTask, hub_offline
from .taskkit import unigram_loss
from .text_tokenizer import EOT, check_vocab, load_tokenizer, token_byte_lengths

HUB_DATASET, HUB_CONFIG = "HuggingFaceFW/fineweb-edu", "sample-10BT"
LOCAL_HELP = ("give local jsonl or parquet files with a 'text' field with --data-files FILE [FILE ...] "
              "(e.g. a few files of sample/10BT downloaded beforehand)")
DOCS_PER_READ = 64  # documents tokenized together (encode_batch runs them in parallel)


@dataclass(frozen=True)
class DocSource:
    """Where documents come from: local files (jsonl/json/parquet), or the hub when there are none."""
    files: tuple[str, ...] = ()
    text_field: str = "text"

    def __str__(self):
        if not self.files:
            return f"hub:{HUB_DATASET}[{HUB_CONFIG}]"
        return f"{len(self.files)} local file(s): {', '.join(self.files[:3])}{' ...' if len(self.files) > 3 else ''}"

    def dataset(self):
        """The streaming IterableDataset of rows, or a one-line error saying what to do instead."""
        import datasets

        # A parquet stream's Arrow scanner threads must be joined while Arrow is alive: left to the
        # interpreter's last teardown they abort the process ("terminate called without an active
        # exception", exit -6) after all the work is done (huggingface/datasets#7566). Collect first.
        atexit.unregister(gc.collect)  # once, however many streams this process opened
        atexit.register(gc.collect)

        if not self.files:
            if hub_offline():
                raise ValueError(f"cannot stream {HUB_DATASET} (offline: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE "
                                 f"is set); {LOCAL_HELP}")
            try:
                return datasets.load_dataset(HUB_DATASET, name=HUB_CONFIG, split="train", streaming=True)
            except Exception as e:  # noqa: BLE001 - datasets raises many kinds of network errors
                raise ValueError(f"cannot reach the Hugging Face hub to stream {HUB_DATASET} "
                                 f"({type(e).__name__}); {LOCAL_HELP}") from None
        kinds = {_file_kind(f) for f in self.files}
        if len(kinds) > 1:
            raise ValueError(f"--data-files mixes formats ({', '.join(sorted(kinds))}); give files of one kind")
        return datasets.load_dataset(kinds.pop(), data_files=list(self.files), split="train", streaming=True)

    def texts(self, rows) -> Iterator[str]:
        """The documents of an iterable of rows, with a one-line error for a missing text field."""
        for row in rows:
            if self.text_field not in row:
                raise ValueError(f"{self} has no {self.text_field!r} field (fields: {', '.join(row)}); "
                                 f"pass --text-field NAME")
            text = row[self.text_field]
            if text and text.strip():
                yield text


def _file_kind(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data-files: {path} does not exist; {LOCAL_HELP}")
    name = path.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json")):
        return "json"
    raise ValueError(f"--data-files: {path} is neither .jsonl/.json nor .parquet")


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def add_data_args(parser):
    g = parser.add_argument_group(f"FineWeb-Edu (--dataset fineweb-edu; default: stream {HUB_DATASET} "
                                  f"{HUB_CONFIG} from the hub)")
    g.add_argument("--data-files", nargs="+", metavar="FILE", help="local jsonl/parquet files with the same schema")
    g.add_argument("--text-field", default="text", help="the field holding each document's text (default: text)")
    g.add_argument("--val-docs", type=int, default=1000, help="the first N documents are the validation set (default 1000)")


def source_from_args(args) -> DocSource:
    return DocSource(tuple(args.data_files or ()), args.text_field)


class TokenStream:
    """One process's packed token stream over its share of the training documents."""

    def __init__(self, source: DocSource, tok, rank: int, world_size: int, skip_keys: set[bytes], state=None):
        from datasets.distributed import split_dataset_by_node

        self.source, self.tok, self.eot = source, tok, tok.token_to_id(EOT)
        self.data = split_dataset_by_node(source.dataset(), rank=rank, world_size=world_size)
        self.data = self.data.filter(lambda row: text_key(row.get(source.text_field) or "") not in skip_keys)
        self.step, self.buffer = 0, np.zeros(0, dtype=np.int64)
        if state is not None:
            self.data.load_state_dict(state["dataset"])
            self.step, self.buffer = state["step"], state["buffer"].numpy().astype(np.int64)
        self.rows = iter(self.data)

    def take(self, n: int) -> np.ndarray:
        """The next n+1 tokens; n of them are consumed (the last one starts the next take)."""
        while len(self.buffer) < n + 1:
            docs = list(self.source.texts(itertools.islice(self.rows, DOCS_PER_READ)))
            if not docs:
                raise ValueError(f"{self.source} ran out of documents after {self.step} steps on this process; "
                                 f"give more data or fewer --max-steps")
            ids = [i for enc in self.tok.encode_batch(docs) for i in (self.eot, *enc.ids)]
            self.buffer = np.concatenate([self.buffer, np.array(ids, dtype=np.int64)])
        out, self.buffer = self.buffer[:n + 1], self.buffer[n:]
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "dataset": self.data.state_dict(), "buffer": torch.from_numpy(self.buffer.copy())}


class FineWebTask(TinyStoriesTask):
    """TinyStoriesTask's evaluation, samples and diagnosis inputs over FineWeb-Edu documents; the
    training batches come from this process's TokenStream (get_rank_batch) instead of a cache."""

    name = "fineweb-edu"
    corpus = "web"  # check_model compares its loss with a web-text scaling fit
    prompts = ("The history of the", "Photosynthesis is the process", "In mathematics, a function")

    def __init__(self, cfg, tokenizer_dir: str, source: DocSource, val_docs: int = 1000):
        self.cfg, self.source = cfg, source
        self.tok, self.tokenizer_json = load_tokenizer(tokenizer_dir)
        check_vocab(self.tok, cfg, tokenizer_dir)
        self.eot = self.tok.token_to_id(EOT)
        self.byte_lengths = token_byte_lengths(self.tok)
        texts = source.texts(source.dataset())
        val = list(itertools.islice(texts, val_docs))
        if len(val) < val_docs:
            raise ValueError(f"{source} holds only {len(val)} documents, all needed for validation "
                             f"({val_docs}); give more data or a smaller --val-docs")
        self.val_keys = {text_key(t) for t in val}
        self.val_tokens = self._tokens(val)
        # a sample of training text as long as the validation set: the train-loss side of the
        # over-fitting gap, random windows for the diagnosis (get_batch) and its known words
        sample, n = [], 0
        for text in texts:
            sample.append(text)
            n += len(text)
            if n >= sum(map(len, val)):
                break
        self.train_tokens = self._tokens(sample)
        window = cfg.max_position_embeddings + 1
        if len(self.train_tokens) < window or len(self.val_tokens) < window:
            raise ValueError(f"{source} gives fewer tokens than one window of {window} for validation or training; "
                             f"give more documents or lower max_position_embeddings")
        self.sources = {"train": str(source), "val": f"the first {val_docs} documents of {source}"}
        self.stream, self.pending_state = None, None
        self.last_samples: list[str] = []

    def _tokens(self, docs: list[str]) -> np.ndarray:
        ids = [i for enc in self.tok.encode_batch(docs) for i in (self.eot, *enc.ids)] + [self.eot]
        return np.array(ids, dtype=np.int32)

    def identity(self) -> dict:
        return {"task": self.name, "tokenizer": self.tokenizer_json, "data": str(self.source)}

    def get_rank_batch(self, step: int, rows: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's `rows` sequences of step `step`, the next ones of its stream."""
        if self.stream is None:
            self.stream = TokenStream(self.source, self.tok, rank, world_size, self.val_keys, self.pending_state)
        if step != self.stream.step:
            raise ValueError(f"the FineWeb-Edu stream is at step {self.stream.step}, not {step}: it is read in "
                             f"order (resume restores its position)")
        T = self.cfg.max_position_embeddings
        w = torch.from_numpy(self.stream.take(rows * T))
        self.stream.step += 1
        return w[:-1].view(rows, T), w[1:].view(rows, T)

    def state_dict(self) -> dict | None:
        """This process's position; before its first batch, the one it will start from (None: the start)."""
        return self.pending_state if self.stream is None else self.stream.state_dict()

    def load_state_dict(self, state: dict | None):
        self.pending_state, self.stream = state, None  # the stream opens at the first batch, at this position

    def milestones(self) -> dict[str, float]:
        ln_v, uni = math.log(self.cfg.vocab_size), unigram_loss(self.get_batch, 10, 16)
        return {f"ln(vocab) {ln_v:.2f}": ln_v, f"unigram {uni:.2f}": uni}
