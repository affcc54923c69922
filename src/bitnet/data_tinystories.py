"""TinyStories: story loading (local files or the hub), token caches, and the task the
shared trainer runs (its byte-level BPE is in text_tokenizer.py).

Sources. Local files in the official format (each story followed by a line `<|endoftext|>`),
or `roneneldan/TinyStories` streamed from the hub with `datasets`. Either way a story is
stripped and its paragraph breaks normalised to one `\\n` (the official .txt style; the HF
parquet text uses `\\n\\n`).

Token stream. `<|endoftext|> story <|endoftext|> story ... <|endoftext|>`: every story is
preceded by the separator, so "start of a story" is a context the model sees in training and
the prompts use at generation time. Each stream is tokenized once into a uint16 memmap (as
llama2.c does), named by a hash of the tokenizer.json and of the data, so it is reused across
runs and rebuilt when either changes.

Bits per byte. Total nats / ln 2 / UTF-8 bytes of the text the predicted tokens decode to.
Special tokens decode to nothing, so `<|endoftext|>` counts 0 bytes: predicting a story's end
is charged to the story text. Unlike the loss per token it does not depend on the tokenizer.
"""
import hashlib
import itertools
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .rundir import atomic_path
from .taskkit import TextCodec, unigram_loss
from .text_tokenizer import (EOT, PAD, check_vocab, load_tokenizer, separator_id, token_byte_lengths,
                             tokenizer_from_identity)
from .words import words_of
HUB_DATASET = "roneneldan/TinyStories"
PROMPTS = ("Once upon a time", "Lily and Ben", "The little dog")
LOADER_VERSION = "v1"  # part of every cache key: bump it when the story normalisation changes
LOCAL_HELP = ("point at local files in the official format with --data-dir DIR (holding train.txt and "
              "valid.txt) or --train-file FILE --val-file FILE")

# ----------------------------------------------------------------------------- stories


@dataclass(frozen=True)
class HubSplit:
    """A split of roneneldan/TinyStories on the hub ("train" or "validation")."""
    split: str

    def __str__(self):
        return f"hub:{HUB_DATASET}[{self.split}]"


def normalize_story(story: str) -> str:
    return re.sub(r"\n{2,}", "\n", story).strip()


def split_stories(text: str) -> list[str]:
    """Stories of official-format text: split exactly at `<|endoftext|>`, normalised, empties dropped."""
    stories = (normalize_story(s) for s in text.split(EOT))
    return [s for s in stories if s]


def _check_file(path: str):
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"{path} {what}; {LOCAL_HELP}")


def iter_file_stories(path: str, chunk_bytes: int = 1 << 24) -> Iterator[str]:
    """Stories of an official-format file, read in chunks so a 2 GB file never sits in memory.

    The file is split on the bytes of `<|endoftext|>` (plain ASCII) before decoding, so a
    non-UTF-8 byte is reported with its exact offset in the file.
    """
    path = str(path)
    _check_file(path)  # here, not on the first next(): a missing file is reported before any progress bar
    return _file_stories(path, chunk_bytes)


def _file_stories(path: str, chunk_bytes: int) -> Iterator[str]:
    sep = EOT.encode()
    n_stories, offset, buf = 0, 0, b""  # offset: position of buf[0] in the file
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            parts = (buf + chunk).split(sep)
            buf = parts.pop() if chunk else b""  # the last part may continue in the next chunk
            for part in parts:
                if b"\0" in part:
                    raise ValueError(binary_error(path, offset + part.index(b"\0")))
                try:
                    story = normalize_story(part.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path} is not UTF-8 text: byte 0x{part[e.start]:02x} at byte offset "
                                     f"{offset + e.start} is invalid; re-save the file as UTF-8") from None
                offset += len(part) + len(sep)
                if story:
                    n_stories += 1
                    yield story
            if not chunk:
                break
    if n_stories == 0:
        raise ValueError(f"{path} holds no stories (is it empty?); expected UTF-8 text with each story "
                         f"followed by a line {EOT}")


def binary_error(path: str, offset: int) -> str:
    return (f"{path} looks like a binary file (a NUL byte at byte offset {offset}), not text; "
            f"expected UTF-8 text with each story followed by a line {EOT}")


def read_text_file(path: str) -> str:
    """A whole official-format file as text (for round-trip checks and `evaluate --text`), with the
    same one-line errors as the story reader for a missing file, non-UTF-8 bytes or no stories."""
    path = str(path)
    _check_file(path)
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data:
        raise ValueError(binary_error(path, data.index(b"\0")))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} "
                         f"is invalid; re-save the file as UTF-8") from None
    if not split_stories(text):
        raise ValueError(f"{path} holds no stories (is it empty?); expected UTF-8 text with each story "
                         f"followed by a line {EOT}")
    return text


def hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def iter_hub_stories(split: str) -> Iterator[str]:
    """Stream a split of roneneldan/TinyStories (the `text` field), or fail at the call with one line
    saying how to use local files instead. Offline mode fails at once instead of retrying."""
    unreachable = f"cannot reach the Hugging Face hub to stream {HUB_DATASET} and no local data was given"
    if hub_offline():
        raise ValueError(f"{unreachable} (offline: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set); {LOCAL_HELP}")
    try:
        import datasets
        rows = iter(datasets.load_dataset(HUB_DATASET, split=split, streaming=True))
        first = next(rows)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds of network errors
        raise ValueError(f"{unreachable} ({type(e).__name__}); {LOCAL_HELP}") from None
    stories = (normalize_story(row["text"]) for row in itertools.chain([first], rows))
    return (s for s in stories if s)


def iter_stories(source) -> Iterator[str]:
    """Stories of a source: a path to an official-format file, or a HubSplit."""
    return iter_hub_stories(source.split) if isinstance(source, HubSplit) else iter_file_stories(source)


def resolve_sources(data_dir: str | None = None, train_file: str | None = None, val_file: str | None = None):
    """(train, val) sources from the command-line flags. Nothing given: both splits from the hub.
    Explicit files override the ones in --data-dir."""
    if data_dir:
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"--data-dir {data_dir} is not a folder; it should hold train.txt and valid.txt")

        def pick(*names):  # our names first, then the official download's
            paths = [os.path.join(data_dir, n) for n in names]
            return next((p for p in paths if os.path.exists(p)), paths[0])
        train_file = train_file or pick("train.txt", "TinyStories-train.txt")
        val_file = val_file or pick("valid.txt", "TinyStories-valid.txt")
    if not train_file and not val_file:
        return HubSplit("train"), HubSplit("validation")
    if not (train_file and val_file):
        raise ValueError("--train-file and --val-file go together (or use --data-dir DIR holding train.txt and valid.txt)")
    return train_file, val_file


def add_data_args(parser):
    g = parser.add_argument_group(f"data (default: stream {HUB_DATASET} from the hub)")
    g.add_argument("--data-dir", help="folder holding train.txt and valid.txt in the official format "
                                      "(each story followed by a line <|endoftext|>)")
    g.add_argument("--train-file", help="official-format training text (overrides --data-dir's train.txt)")
    g.add_argument("--val-file", help="official-format validation text (overrides --data-dir's valid.txt)")


def sources_from_args(args):
    return resolve_sources(args.data_dir, args.train_file, args.val_file)

# ----------------------------------------------------------------------------- tokens


def encode_stories(tok, stories: list[str]) -> np.ndarray:
    """Each story's tokens followed by <|endoftext|> (separator_id), as one uint16 array."""
    eot = separator_id(tok)
    ids = [i for enc in tok.encode_batch(stories) for i in (*enc.ids, eot)]
    return np.array(ids, dtype=np.uint16)

def text_tokens(tok, text: str) -> np.ndarray:
    """The token stream of official-format text, exactly as a cache of the same stories holds it."""
    stories = split_stories(text)
    if not stories:
        raise ValueError(f"the text holds no stories; expected UTF-8 text with each story followed by a line {EOT}")
    return np.concatenate([np.array([separator_id(tok)], dtype=np.uint16), encode_stories(tok, stories)])

# ----------------------------------------------------------------------------- token caches


def sha256_file(path: str) -> str:
    _check_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def cache_path(source, tokenizer_json: str, cache_dir: str) -> str:
    """Where the token stream of `source` under this tokenizer lives. Local data is keyed by its
    bytes; a hub split by its name (the hub's content does not change under us)."""
    if isinstance(source, HubSplit):
        label, data_key = f"hub-{source.split}", str(source)
    else:
        label, data_key = os.path.splitext(os.path.basename(source))[0], sha256_file(source)
    tok_key = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
    key = hashlib.sha256(f"{LOADER_VERSION}|{tok_key}|{data_key}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{label}-{key}.bin")


def build_token_cache(source, tok, path: str) -> int:
    """Tokenize `source` into `path`, atomically: never a half-written cache. Returns the token count."""
    if tok.get_vocab_size() > 2**16:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens; the uint16 cache holds at most 65,536")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    t0, n_tokens = time.time(), 1
    with atomic_path(path, "the token cache", then="free some space and run again") as tmp, open(tmp, "wb") as f:
        np.array([separator_id(tok)], dtype=np.uint16).tofile(f)
        stories = tqdm(iter_stories(source), desc=f"tokenizing {source}", unit=" stories",  # delay: no bar for
                       file=sys.stderr, mininterval=2.0, leave=False, delay=2.0)  # a quick job or a bad file's error
        for batch in iter(lambda it=iter(stories): list(itertools.islice(it, 1024)), []):
            ids = encode_stories(tok, batch)
            ids.tofile(f)
            n_tokens += len(ids)
    print(f"tokenized {source}: {n_tokens:,} tokens in {time.time() - t0:.1f}s -> {path}")
    return n_tokens


def load_tokens(source, tok, tokenizer_json: str, cache_dir: str) -> np.memmap:
    """The token stream of `source`, from its cache (built on first use)."""
    path = cache_path(source, tokenizer_json, cache_dir)
    if not os.path.exists(path):
        build_token_cache(source, tok, path)
    else:
        print(f"{source}: using cached tokens {path}")
    return np.memmap(path, dtype=np.uint16, mode="r")

# ----------------------------------------------------------------------------- evaluation


def eval_windows(n_stream: int, context: int, n_tokens: int) -> list[tuple[int, int]]:
    """Fixed (start, length) windows whose targets do not overlap: inputs stream[s:s+length],
    targets one token later. n_tokens <= 0 means every token of the stream, the tail included;
    otherwise n_tokens // context full windows spread evenly over the stream."""
    n_full = (n_stream - 1) // context
    if n_tokens > 0 and n_tokens // context < n_full:
        n = max(1, n_tokens // context)
        starts = np.linspace(0, n_stream - context - 1, n).astype(np.int64)  # spacing >= context: no overlap
        return [(int(s), context) for s in starts]
    windows = [(i * context, context) for i in range(n_full)]
    tail = n_stream - 1 - n_full * context
    if tail > 0 and (n_tokens <= 0 or n_full == 0):  # the whole stream, or a stream shorter than one window
        windows.append((n_full * context, tail))
    return windows


@torch.no_grad()
def stream_metrics(model, tokens: np.ndarray, n_tokens: int, device, batch_size: int,
                   byte_lengths: np.ndarray) -> dict:
    """Mean next-token loss and bits per byte over fixed windows of a token stream (see eval_windows)."""
    context = model.config.max_position_embeddings
    windows = eval_windows(len(tokens), context, n_tokens)
    was_training = model.training
    model.eval()
    nats, count, n_bytes = 0.0, 0, 0
    for length in sorted({n for _, n in windows}):  # full windows batch together; a short tail on its own
        starts = [s for s, n in windows if n == length]
        for i in range(0, len(starts), batch_size):
            w = np.stack([tokens[s:s + length + 1] for s in starts[i:i + batch_size]]).astype(np.int64)
            w = torch.from_numpy(w).to(device)
            logits, _ = model(w[:, :-1])
            nats += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
            count += w[:, 1:].numel()
            n_bytes += int(byte_lengths[w[:, 1:].cpu().numpy()].sum())
    model.train(was_training)
    return {"n_tokens": count, "val_loss": nats / count, "bits_per_byte": nats / math.log(2) / max(1, n_bytes)}


def text_metrics(model, tokenizer, text: str, device, max_tokens: int = 0, batch_size: int = 16) -> dict:
    """Loss and bits per byte of `model` on official-format text (stories separated by <|endoftext|>),
    tokenized like the training data. `tokenizer` is a tokenizers.Tokenizer or a transformers fast
    tokenizer; max_tokens 0 = all of the text."""
    tok = getattr(tokenizer, "backend_tokenizer", tokenizer)
    tokens = text_tokens(tok, text)
    return stream_metrics(model, tokens, max_tokens, device, batch_size, token_byte_lengths(tok))

# ----------------------------------------------------------------------------- the task


class TinyStoriesTask:
    """What the shared trainer needs from an experiment: batches, evaluation, identity."""

    name = "tinystories"
    corpus = "tinystories"  # check_model's reference band for a loss on this text
    prompts = PROMPTS  # what generate_stories() continues at each evaluation

    def __init__(self, cfg, tokenizer_dir: str, train_source, val_source, cache_dir: str, tokenizer=None):
        """`tokenizer`: (tokenizers.Tokenizer, its JSON) to use instead of tokenizer_dir's (data_user's
        --data-tokenizer); its documents are separated by its end-of-document token (separator_id)."""
        self.cfg = cfg
        self.tok, self.tokenizer_json = tokenizer or load_tokenizer(tokenizer_dir)
        check_vocab(self.tok, cfg, tokenizer_dir)
        self.eot = separator_id(self.tok)
        self.byte_lengths = token_byte_lengths(self.tok)
        self.sources = {"train": str(train_source), "val": str(val_source)}
        self.train_tokens = load_tokens(train_source, self.tok, self.tokenizer_json, cache_dir)
        self.val_tokens = load_tokens(val_source, self.tok, self.tokenizer_json, cache_dir)
        window = cfg.max_position_embeddings + 1
        if len(self.train_tokens) < window:
            raise ValueError(f"{train_source} gives {len(self.train_tokens)} tokens, fewer than one training "
                             f"window of {window}; give more text or lower max_position_embeddings")
        self.last_samples: list[str] = []  # the stories of the latest evaluation, for the closing summary

    def identity(self) -> dict:
        return {"task": self.name, "tokenizer": self.tokenizer_json}  # the checkpoint carries its tokenizer

    @classmethod
    def codec(cls, identity: dict) -> TextCodec:
        """The codec of a checkpoint with this identity (tasks.codec_for): training puts
        <|endoftext|> before every document, so prompts start with it too."""
        tok = tokenizer_from_identity(identity)
        eot = tok.token_to_id(EOT)
        return TextCodec(tok, eot, prefix=(eot,), pad_id=tok.token_to_id(PAD), corpus=cls.corpus)

    def get_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of the training stream, a pure function of (seed, step): resumes exactly."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        window = self.cfg.max_position_embeddings + 1
        starts = torch.randint(0, len(self.train_tokens) - window + 1, (batch_size,), generator=g).tolist()
        w = torch.from_numpy(np.stack([self.train_tokens[s:s + window] for s in starts]).astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def evaluate(self, model, device, step: int) -> dict:
        cfg = self.cfg
        val = stream_metrics(model, self.val_tokens, cfg.eval_tokens, device, cfg.batch_size, self.byte_lengths)
        # as many training tokens as validation ones: the gap between the two shows over-fitting
        train = stream_metrics(model, self.train_tokens, val["n_tokens"], device, cfg.batch_size, self.byte_lengths)
        self.last_samples = self.generate_stories(model, device)
        return {"val_loss": val["val_loss"], "bits_per_byte": val["bits_per_byte"],
                "train_loss_eval": train["val_loss"], "eval_tokens": val["n_tokens"],
                "samples": [s.replace("\n", " ") for s in self.last_samples]}

    # --- what the diagnosis needs (see bitnet.diagnose) ---
    learning_kwargs: dict = {}
    metric_keys = ["bits_per_byte", "train_loss_eval"]

    def milestones(self) -> dict[str, float]:
        ln_v, uni = math.log(self.cfg.vocab_size), unigram_loss(self.get_batch, 10, 16)
        return {f"ln(vocab) {ln_v:.2f}": ln_v, f"unigram {uni:.2f}": uni, "5.0 (seed: stuck above)": 5.0,
                "2.0 (target)": 2.0}

    def diagnosis_inputs(self, model) -> dict:
        if not self.last_samples:
            self.last_samples = self.generate_stories(model, next(model.parameters()).device)
        known = set(words_of(self.tok.decode(self.train_tokens[:1_000_000].tolist())))
        return {"samples": self.last_samples, "known_words": known, "batch": self.get_batch(0, 4)}

    def format_eval(self, m: dict) -> str:
        return (f"val loss {m['val_loss']:.4f} ({m['bits_per_byte']:.4f} bits/byte) | "
                f"train loss {m['train_loss_eval']:.4f} (same {m['eval_tokens']:,} tokens each)")

    @torch.no_grad()
    def generate_stories(self, model, device, temperature: float = 0.8, top_k: int = 50) -> list[str]:
        """One story per fixed prompt. The sampler is seeded the same way at every evaluation, so
        the stories change only because the model does. A story that ended ends in <|endoftext|>."""
        stories = []
        for i, prompt in enumerate(self.prompts):
            g = torch.Generator(device=device).manual_seed(self.cfg.seed + i)
            ids = torch.tensor([[self.eot] + self.tok.encode(prompt).ids], device=device)
            out = model.generate(ids, self.cfg.sample_tokens, temperature=temperature, top_k=top_k,
                                 stop_token=self.eot, generator=g)[0, 1:].tolist()
            ended = self.eot in out
            text = self.tok.decode(out[:out.index(self.eot)] if ended else out)
            stories.append(text + (f" {EOT}" if ended else ""))
        return stories
