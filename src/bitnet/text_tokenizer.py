"""The byte-level BPE of the text tasks (TinyStories, FineWeb-Edu): training it, saving it
in the layout transformers reads, loading it, and rebuilding it from a checkpoint's identity."""
import itertools
import os
import shutil
from typing import Iterable

import numpy as np

from .rundir import raise_if_disk_full
from .taskkit import TextCodec

EOT = "<|endoftext|>"  # before every document in training, so prompts start with it too
PAD = "<|pad|>"
END_NAMES = (EOT, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")  # end-of-document tokens, ours first


def train_bpe(stories: Iterable[str], vocab_size: int = 2048, show_progress: bool = True):
    """A byte-level BPE: every byte is in the alphabet and nothing is normalised, so any text
    round-trips exactly. `<|endoftext|>` (id 0) and the pad token (id 1) are special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    batches = iter(lambda it=iter(stories): list(itertools.islice(it, 1000)), [])  # lists of 1000: fewer calls
    tok.train_from_iterator(batches, trainer=trainer)
    return tok


def save_tokenizer(tok, out_dir: str):
    """tokenizer.json plus the config files `transformers.AutoTokenizer.from_pretrained(out_dir)` reads.
    tokenizer.json is moved in last, so its presence means the folder is complete."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)  # the cleanup would break round-trips
    tmp = f"{out_dir.rstrip('/')}.tmp.{os.getpid()}"
    try:
        fast.save_pretrained(tmp)
    except Exception as e:  # a full disk: one line, and no half-written folder left
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(e, "the tokenizer", out_dir, then="free some space and run again")
        raise
    os.makedirs(out_dir, exist_ok=True)
    for name in sorted(os.listdir(tmp), key=lambda n: n == "tokenizer.json"):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def load_tokenizer(tokenizer_dir: str):
    """(tokenizers.Tokenizer, the tokenizer.json text) from a folder written by save_tokenizer."""
    from tokenizers import Tokenizer

    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}; train one with "
                                f"python train_tinystories_tokenizer.py --out-dir {tokenizer_dir}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    tok = Tokenizer.from_str(text)
    if tok.token_to_id(EOT) is None:
        raise ValueError(f"{path} has no {EOT} token; train the tokenizer with train_tinystories_tokenizer.py")
    return tok, text


def separator_id(tok) -> int | None:
    """The token put between documents: <|endoftext|>, or the end-of-document token of a tokenizer
    made elsewhere (train_bitnet_tiny.py --data-tokenizer); None when it has neither."""
    return next((tok.token_to_id(t) for t in END_NAMES if tok.token_to_id(t) is not None), None)


def check_vocab(tok, cfg, tokenizer_dir: str):
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {tok.get_vocab_size()} tokens but "
                         f"vocab_size is {cfg.vocab_size}; pass --set vocab_size={tok.get_vocab_size()}")


def tokenizer_from_identity(identity: dict):
    """The tokenizer a checkpoint was trained with (its task identity holds the tokenizer.json text)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(identity["tokenizer"])


def foreign_text_codec(identity: dict) -> TextCodec:
    """The codec of a transformers folder made elsewhere: its tokenizer.json adds its own specials."""
    return TextCodec(tokenizer_from_identity(identity), identity.get("eos_token_id"))


def token_byte_lengths(tok) -> np.ndarray:
    """UTF-8 bytes that each token id stands for (0 for special tokens). Summed over any window they
    give its exact byte count, even where the window cuts a multi-byte character in two."""
    from tokenizers import pre_tokenizers

    byte_chars = set(pre_tokenizers.ByteLevel.alphabet())  # byte-level BPE writes one char per byte
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for piece, i in tok.get_vocab().items():
        if i not in special:
            lengths[i] = len(piece) if set(piece) <= byte_chars else len(tok.decode([i]).encode("utf-8"))
    return lengths
