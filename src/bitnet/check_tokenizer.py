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
import sys

from .diagnose.tokenizer_checks import TokenizerError, examples_of, load_codec, roundtrip_report
from .errors import run_main
# the shared TinyStories validation text beside the checkout (../shared), when there is one
DEFAULT_TEXT = next((os.path.join(d, "shared", "data", "tinystories", "valid.txt")
                     for d in [os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * n)) for n in range(2, 6)]
                     if os.path.isfile(os.path.join(d, "shared", "data", "tinystories", "valid.txt"))), "")
SAMPLE = ("Once upon a time, there was a little girl named Lily. She loved to play outside!\n"
          "\"Can I have 3 apples?\" asked Tom. His mom said, \"Yes, you can.\"\n"
          "They didn't know what to do... so they laughed; it was 5:30 pm.\n")


def check_tokenizer(path: str, text: str, max_examples: int = 2000) -> dict:
    codec = load_codec(path)
    examples = examples_of(text, max_examples)
    if not examples:
        raise TokenizerError("the text has no examples (it is empty)")
    report = roundtrip_report(codec, examples)
    return {"verdict": "BROKEN" if report["problems"] else "OK", "tokenizer": path, **report}


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
    sys.exit(run_main(main))  # a bug of ours exits 70 with its traceback, never 1 (BROKEN)
