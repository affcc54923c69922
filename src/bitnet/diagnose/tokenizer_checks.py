"""One view of any tokenizer (Codec) and the checks that judge it, shared by check_tokenizer and check_data.

A Codec wraps a tokenizers JSON file, a transformers tokenizer folder, or an object a user's
SPEC names (a transformers tokenizer, a tokenizers.Tokenizer, a tiktoken Encoding, or anything
with encode/decode, like our CharTokenizer). It answers: encode without special tokens, encode
as inference does (the tokenizer's default, special tokens included), decode, the name of an
id, the vocabulary size and the special ids (bos, eos, pad, unk).
"""
import os
import re

BOS_NAMES = ("<s>", "<bos>", "[CLS]", "<|begin_of_text|>", "<|startoftext|>", "<|bos|>")
EOS_NAMES = ("</s>", "<eos>", "[SEP]", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eos|>")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
UNK_NAMES = ("<unk>", "[UNK]", "<|unk|>")
EOT = "<|endoftext|>"


class TokenizerError(ValueError):
    """The tokenizer or the text cannot be read: exit 2."""


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class Codec:
    """encode/decode/names/special ids of one tokenizer, whatever its library."""

    def __init__(self, encode, decode, encode_for_inference=None, name_of=None, vocab_size=None,
                 special_ids=(), bos_id=None, eos_id=None, pad_id=None, unk_id=None, normalizer=None):
        self.encode, self.decode = encode, decode
        self.encode_for_inference = encode_for_inference or encode
        self.name_of = name_of or (lambda i: f"#{i}")
        self.vocab_size, self.normalizer = vocab_size, normalizer
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.special_ids = {i for i in (*special_ids, bos_id, eos_id, pad_id, unk_id) if i is not None}

    def normalize(self, s: str) -> str:
        return self.normalizer.normalize_str(s) if self.normalizer is not None else s


def by_name(ids_by_name: dict, names) -> int | None:
    return next((ids_by_name[n] for n in names if n in ids_by_name), None)


def from_tokenizers(tok) -> Codec:
    """A tokenizers.Tokenizer: specials are its added special tokens; inference encodes with its post-processor."""
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    unk = getattr(tok.model, "unk_token", None)
    return Codec(encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
                 decode=lambda ids: tok.decode(list(ids), skip_special_tokens=False),
                 encode_for_inference=lambda s: tok.encode(s).ids,
                 name_of=lambda i: tok.id_to_token(int(i)) or f"#{i}",
                 vocab_size=tok.get_vocab_size(with_added_tokens=True), special_ids=specials.values(),
                 bos_id=by_name(specials, BOS_NAMES), eos_id=by_name(specials, EOS_NAMES),
                 pad_id=by_name(specials, PAD_NAMES), unk_id=tok.token_to_id(unk) if unk else by_name(specials, UNK_NAMES),
                 normalizer=tok.normalizer)


def from_transformers(tok) -> Codec:
    backend = getattr(tok, "backend_tokenizer", None)
    return Codec(encode=lambda s: tok(s, add_special_tokens=False)["input_ids"],
                 decode=lambda ids: tok.decode(list(ids), skip_special_tokens=False,
                                               clean_up_tokenization_spaces=False),
                 encode_for_inference=lambda s: tok(s)["input_ids"],
                 name_of=lambda i: tok.convert_ids_to_tokens(int(i)) or f"#{i}", vocab_size=len(tok),
                 special_ids=tok.all_special_ids, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                 pad_id=tok.pad_token_id, unk_id=tok.unk_token_id, normalizer=getattr(backend, "normalizer", None))


def from_object(obj) -> Codec:
    """A user's tokenizer object (or the tokenizer a SPEC's factory returns)."""
    if callable(obj) and not hasattr(obj, "decode"):
        obj = obj()  # a factory
    if hasattr(obj, "convert_ids_to_tokens"):
        return from_transformers(obj)
    if hasattr(obj, "get_added_tokens_decoder"):
        return from_tokenizers(obj)
    if hasattr(obj, "encode_ordinary"):  # tiktoken
        eot = getattr(obj, "eot_token", None)
        return Codec(encode=obj.encode_ordinary, decode=obj.decode, vocab_size=obj.n_vocab,
                     name_of=lambda i: repr(obj.decode([int(i)])), eos_id=eot, special_ids=[eot] if eot is not None else ())
    if not (hasattr(obj, "encode") and hasattr(obj, "decode")):
        raise TokenizerError(f"{type(obj).__name__} is not a tokenizer: it needs encode() and decode()")
    attr = lambda *names: next((getattr(obj, n) for n in names if isinstance(getattr(obj, n, None), int)), None)  # noqa: E731
    itos = getattr(obj, "itos", None)
    vocab = getattr(obj, "vocab_size", None) or getattr(obj, "n_vocab", None) or (len(itos) if itos else None)
    return Codec(encode=obj.encode, decode=obj.decode, vocab_size=vocab,
                 name_of=(lambda i: itos[int(i)] if 0 <= int(i) < len(itos) else f"#{i}") if itos else None,
                 bos_id=attr("bos_token_id", "bos_id"), eos_id=attr("eos_token_id", "eos_id", "eot_token"),
                 pad_id=attr("pad_token_id", "pad_id"), unk_id=attr("unk_token_id", "unk_id"))


def load_codec(path: str) -> Codec:
    """A tokenizers JSON file or a transformers tokenizer folder."""
    if os.path.isdir(path):
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise TokenizerError(f"cannot load a transformers tokenizer from {path}: {first_line(e)}") from None
        return from_transformers(tok)
    if os.path.isfile(path):
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path} is not a tokenizers JSON file: {e}") from None
        return from_tokenizers(tok)
    raise TokenizerError(f"no tokenizer at {path}: give a tokenizer.json file or a transformers tokenizer folder")


def tokenizer_of(arg: str, paths=()) -> Codec:
    """--tokenizer as every tool takes it: a tokenizers JSON file or a transformers folder, else a
    SPEC naming a tokenizer object (or a factory of one)."""
    from ..spec import resolve_spec
    if os.path.exists(arg) or ":" not in arg:
        return load_codec(arg)
    return from_object(resolve_spec(arg, paths))


# ----------------------------------------------------------------------------- round trips

def examples_of(text: str, limit: int) -> list[str]:
    """Documents of a text: split at <|endoftext|> when it has one, else its non-empty lines."""
    parts = text.split(EOT) if EOT in text else text.splitlines()
    return [p.strip() for p in parts if p.strip()][:limit]


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def squeeze_spaces(s: str) -> str:
    return re.sub(r"\s+", "", s)


def classify(codec: Codec, original: str, decoded: str, ids: list[int]) -> str:
    """Why one example does not round-trip: the problem name."""
    if codec.unk_id is not None and codec.unk_id in ids:
        return "unk_tokens"
    if squeeze_spaces(decoded) == squeeze_spaces(original) and len(decoded) > len(original):
        return "decode_adds_spaces"
    if codec.normalize(original) != original or decoded == original.lower():
        return "lossy_normalizer"
    return "decode_mismatch"


ROUNDTRIP_ORDER = ("whitespace_lost", "decode_adds_spaces", "lossy_normalizer", "unk_tokens", "decode_mismatch")


def roundtrip_report(codec: Codec, examples: list[str], newlines_first: bool = False) -> dict:
    """decode(encode(x)) == x on each example: the problems, exact-match and unknown-token rates.
    `newlines_first`: an example that comes back with fewer newlines is whitespace_lost (check_model
    reads whole documents; check_data asks the tokenizer about newlines apart, whitespace_probe)."""
    exact, n_tokens, n_unk, n_bytes = 0, 0, 0, 0
    causes, first = {}, None
    for x in examples:
        ids = list(codec.encode(x))
        decoded = codec.decode(ids)
        n_tokens += len(ids)
        n_bytes += len(x.encode("utf-8"))
        n_unk += sum(1 for i in ids if codec.unk_id is not None and i == codec.unk_id)
        if decoded == x:
            exact += 1
            continue
        lost = newlines_first and x.count("\n") > decoded.count("\n")
        cause = "whitespace_lost" if lost else classify(codec, x, decoded, ids)
        causes[cause] = causes.get(cause, 0) + 1
        if first is None:
            at = first_difference(x, decoded)
            first = {"cause": cause, "at_char": at, "original": x[max(0, at - 40): at + 60],
                     "decoded": decoded[max(0, at - 40): at + 60]}
    if n_unk:
        causes.setdefault("unk_tokens", 0)
    problems = [p for p in ROUNDTRIP_ORDER if p in causes]
    return {"problems": problems, "exact": exact, "exact_match_rate": exact / max(len(examples), 1),
            "unk_rate": n_unk / max(n_tokens, 1), "bytes_per_token": n_bytes / max(n_tokens, 1),
            "examples": len(examples), "examples_failing_by_cause": causes, "first_difference": first}


def whitespace_probe(codec: Codec) -> dict:
    """What the tokenizer does to a newline and to punctuation: {"keeps_newline", "adds_spaces"}
    (None where the tokenizer cannot encode the probe, e.g. a character vocabulary without letters)."""
    out = {}
    for key, text, ok in (("keeps_newline", "one\ntwo", lambda d: "\n" in d),
                          ("adds_spaces", "yes, it is.", lambda d: not re.search(r"\s[,.]", d))):
        try:
            decoded = codec.decode(list(codec.encode(text)))
            out[key] = ok(decoded) if key == "keeps_newline" else not ok(decoded)
        except Exception:  # noqa: BLE001 - a tokenizer that cannot encode the probe says nothing here
            out[key] = None
    return out
