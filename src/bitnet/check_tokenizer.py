"""Judge a tokenizer alone: `python -m bitnet.check_tokenizer PATH [--text FILE]`.

PATH is a tokenizers JSON file (tokenizer.json) or a transformers tokenizer folder. Every example
of the text (stories split at <|endoftext|>, else non-empty lines) is encoded without special
tokens and decoded, and decode(encode(x)) must give x back exactly. Reported: the exact-match
rate and the first example that differs, the share of unknown tokens, and UTF-8 bytes per token.
Problems (defined in the README, "Check your own tokenizer"):
  decode_adds_spaces  the decoded text differs from x only by added whitespace
  lossy_normalizer    the tokenizer's normalizer changes the text (lower-casing, Unicode folding, ...)
  unk_tokens          some of the text encodes to the unknown token
  decode_mismatch     decode(encode(x)) != x in a way none of the above explains
The last line is JSON {"verdict", "problems", "tokenizer", "exact_match_rate", "unk_rate",
"bytes_per_token"}. Exit 0 OK, 1 BROKEN, 2 when the tokenizer or text cannot be read.
"""
import argparse
import json
import os
import re
import sys

EOT = "<|endoftext|>"
# the shared TinyStories validation text beside the checkout (../shared), when there is one
DEFAULT_TEXT = next((os.path.join(d, "shared", "data", "tinystories", "valid.txt")
                     for d in [os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * n)) for n in range(2, 6)]
                     if os.path.isfile(os.path.join(d, "shared", "data", "tinystories", "valid.txt"))), "")
SAMPLE = ("Once upon a time, there was a little girl named Lily. She loved to play outside!\n"
          "\"Can I have 3 apples?\" asked Tom. His mom said, \"Yes, you can.\"\n"
          "They didn't know what to do... so they laughed; it was 5:30 pm.\n")


class TokenizerError(ValueError):
    """The tokenizer or the text cannot be read: exit 2."""


class Codec:
    """encode/decode/unk of a tokenizers.Tokenizer or a transformers tokenizer, without special tokens."""

    def __init__(self, path: str):
        if os.path.isdir(path):
            try:
                from transformers import AutoTokenizer
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as e:
                raise TokenizerError(f"cannot load a transformers tokenizer from {path}: {type(e).__name__}: "
                                     f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
            self.encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
            self.decode = lambda ids: tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self.unk_id = tok.unk_token_id
            backend = getattr(tok, "backend_tokenizer", None)
            self.normalizer = getattr(backend, "normalizer", None)
        elif os.path.isfile(path):
            from tokenizers import Tokenizer
            try:
                tok = Tokenizer.from_file(path)
            except Exception as e:
                raise TokenizerError(f"{path} is not a tokenizers JSON file: {e}") from None
            self.encode = lambda s: tok.encode(s, add_special_tokens=False).ids
            self.decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
            unk = getattr(tok.model, "unk_token", None)
            self.unk_id = tok.token_to_id(unk) if unk else None
            self.normalizer = tok.normalizer
        else:
            raise TokenizerError(f"no tokenizer at {path}: give a tokenizer.json file or a transformers tokenizer folder")

    def normalize(self, s: str) -> str:
        return self.normalizer.normalize_str(s) if self.normalizer is not None else s


def examples_of(text: str, limit: int) -> list[str]:
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


def check_tokenizer(path: str, text: str, max_examples: int = 2000) -> dict:
    codec = Codec(path)
    examples = examples_of(text, max_examples)
    if not examples:
        raise TokenizerError("the text has no examples (it is empty)")
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
        cause = classify(codec, x, decoded, ids)
        causes[cause] = causes.get(cause, 0) + 1
        if first is None:
            at = first_difference(x, decoded)
            first = {"cause": cause, "at_char": at, "original": x[max(0, at - 40): at + 60],
                     "decoded": decoded[max(0, at - 40): at + 60]}
    if n_unk:
        causes.setdefault("unk_tokens", 0)
    order = ("decode_adds_spaces", "lossy_normalizer", "unk_tokens", "decode_mismatch")
    problems = [p for p in order if p in causes]
    return {"verdict": "BROKEN" if problems else "OK", "problems": problems, "tokenizer": path,
            "exact_match_rate": exact / len(examples), "unk_rate": n_unk / max(n_tokens, 1),
            "bytes_per_token": n_bytes / max(n_tokens, 1), "examples": len(examples),
            "examples_failing_by_cause": causes, "first_difference": first}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Check that a tokenizer gives the text back: decode(encode(x)) == x.")
    p.add_argument("path", metavar="PATH", help="tokenizer.json, or a transformers tokenizer folder")
    p.add_argument("--text", metavar="FILE", help="text to check (default: the shared TinyStories valid.txt if "
                                                  "present, else a built-in sample)")
    p.add_argument("--max-examples", type=int, default=2000)
    args = p.parse_args(argv)
    try:
        source = args.text or DEFAULT_TEXT or None
        if source is not None:
            try:
                with open(source, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"cannot read --text {source}: {e}") from None
        else:
            source, text = "built-in sample", SAMPLE
        report = check_tokenizer(args.path, text, args.max_examples)
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer {args.path} on {report['examples']:,} examples of {source}")
    print(f"  decode(encode(x)) == x   {report['exact_match_rate']:.2%} of examples")
    print(f"  unknown tokens           {report['unk_rate']:.3%} of tokens")
    print(f"  bytes per token          {report['bytes_per_token']:.2f}")
    if report["examples_failing_by_cause"]:
        print("  failing examples by cause: " + ", ".join(f"{k} {v}" for k, v in report["examples_failing_by_cause"].items()))
    if report["first_difference"]:
        d = report["first_difference"]
        print(f"  first difference ({d['cause']}, at character {d['at_char']}):\n"
              f"    original: {d['original']!r}\n    decoded:  {d['decoded']!r}")
    print(json.dumps({k: report[k] for k in ("verdict", "problems", "tokenizer", "exact_match_rate", "unk_rate",
                                             "bytes_per_token")}))
    return 0 if report["verdict"] == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
