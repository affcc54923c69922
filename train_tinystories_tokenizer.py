"""Train the byte-level BPE tokenizer for TinyStories (2,048 tokens by default), or for FineWeb-Edu.

    python train_tinystories_tokenizer.py --data-dir ../shared/data/tinystories --out-dir runs/tinystories/tokenizer
    python train_tinystories_tokenizer.py --out-dir runs/tok --max-stories 100000   # streamed from the hub
    python train_tinystories_tokenizer.py --dataset fineweb-edu --vocab-size 32000 --out-dir runs/fw-tok  # 32K, sample-10BT

Writes OUT_DIR/tokenizer.json and the config that transformers.AutoTokenizer.from_pretrained(OUT_DIR) reads.
"""
import argparse
import itertools
import sys
import time

from tqdm.auto import tqdm

from bitnet import data_fineweb
from bitnet.data_tinystories import add_data_args, iter_stories, read_text_file, sources_from_args
from bitnet.errors import run_main
from bitnet.text_tokenizer import save_tokenizer, train_bpe


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", required=True, help="folder for tokenizer.json (created if missing)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokens in all, the 2 special ones included")
    p.add_argument("--max-stories", type=int, default=200_000,
                   help="train on at most this many training stories or documents (0 = all; bounds the hub stream)")
    p.add_argument("--dataset", choices=["tinystories", "fineweb-edu"], default="tinystories")
    add_data_args(p)
    data_fineweb.add_data_args(p)
    args = p.parse_args()
    if args.vocab_size < 258:
        raise ValueError(f"--vocab-size must be at least 258 (256 bytes + 2 special tokens), got {args.vocab_size}")
    if args.dataset == "fineweb-edu":
        # validation is the stream's first documents (data_fineweb), so they check the round trip
        train_source = val_source = data_fineweb.source_from_args(args)
        stories = train_source.texts(train_source.dataset())
    else:
        train_source, val_source = sources_from_args(args)
        stories = iter_stories(train_source)

    t0 = time.time()
    if args.max_stories > 0:
        stories = itertools.islice(stories, args.max_stories)
    n_stories, n_bytes = 0, 0

    def counted(stories):
        nonlocal n_stories, n_bytes
        for story in tqdm(stories, desc=f"reading {train_source}", unit=" stories", file=sys.stderr, mininterval=1.0):
            n_stories += 1
            n_bytes += len(story.encode("utf-8"))
            yield story

    tok = train_bpe(counted(stories), args.vocab_size)
    save_tokenizer(tok, args.out_dir)
    print(f"trained a {tok.get_vocab_size():,}-token byte-level BPE on {n_stories:,} stories "
          f"({n_bytes / 1e6:.1f} MB) from {train_source} in {time.time() - t0:.1f}s -> {args.out_dir}/tokenizer.json")

    if isinstance(val_source, data_fineweb.DocSource):
        text = "".join(itertools.islice(val_source.texts(val_source.dataset()), 100))
    elif isinstance(val_source, str):
        text = read_text_file(val_source)
    else:
        return
    ids = tok.encode(text).ids
    ok = tok.decode(ids, skip_special_tokens=False) == text
    print(f"{val_source}: {len(ids):,} tokens, {len(text.encode('utf-8')) / len(ids):.2f} bytes/token, "
          f"encode->decode round-trip {'exact' if ok else 'NOT exact'}")
    if not ok:
        raise ValueError(f"the tokenizer does not round-trip {val_source} exactly; please report this")


if __name__ == "__main__":
    run_main(main)
