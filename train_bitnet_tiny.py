"""Train a BitNet b1.58 model (or its full-precision twin) on TinyStories.

    python train_bitnet_tiny.py --out-dir runs/ts --data-dir ../shared/data/tinystories   # tokenizer in runs/ts/tokenizer
    python train_bitnet_tiny.py --out-dir runs/ts-fp --quant none --tokenizer runs/ts/tokenizer --data-dir ...
    python train_bitnet_tiny.py --out-dir runs/ts --tokenizer runs/ts/tokenizer     # stream the data from the hub
    python train_bitnet_tiny.py --dataset fineweb-edu --preset 200m --out-dir runs/fw --tokenizer runs/fw-tok
    python train_bitnet_tiny.py --preset 95m --out-dir runs/95m --dry-run   # the plan as one JSON line, nothing built
    python train_bitnet_tiny.py --out-dir runs/mine --data my_loader.py:batches --data-kwargs '{"bs": 8}' ...  # yours vs ours

The 12M seed config ("tiny") on a GPU, the smaller "tiny-cpu" preset otherwise. Many GPUs: the
same command under `torchrun --standalone --nproc_per_node N` (see bitnet/distributed.py).
"""
import os

from bitnet import data_fineweb
from bitnet.cli import add_user_data_args, build_config, choose_preset, common_parser, dry_run, set_threads
from bitnet.data_tinystories import TinyStoriesTask, add_data_args, sources_from_args
from bitnet.data_user import UserDataTask, load_data_tokenizer
from bitnet.user_batches import RowStream, parse_kwargs
from bitnet.errors import run_main
from bitnet.experiment import run_experiment


def main():
    p = common_parser(__doc__.split("\n")[0], gpu_preset="tiny", cpu_preset="tiny-cpu")
    p.add_argument("--dataset", choices=["tinystories", "fineweb-edu"], default="tinystories",
                   help="tinystories (local files or the hub), or fineweb-edu (sample-10BT, streamed; for 95m/200m)")
    add_data_args(p)
    data_fineweb.add_data_args(p)
    p.add_argument("--tokenizer", metavar="DIR", help="folder holding tokenizer.json (default OUT_DIR/tokenizer)")
    p.add_argument("--cache-dir", help="where tokenized data is cached (default OUT_DIR/cache); safe to share")
    add_user_data_args(p)
    args = p.parse_args()
    if args.data and (args.twin or args.dataset != "tinystories"):
        raise ValueError("--data compares your batches with our TinyStories ones on one model; drop --twin and --dataset")
    if args.data_tokenizer and args.data is None:
        raise ValueError("--data-tokenizer names the tokenizer of --data's batches; add --data SPEC")
    if choose_preset(args) and args.dry_run is None:
        print(f"preset {args.preset}: " + ("the 12M seed config on CUDA" if args.preset == "tiny" else
              "no CUDA GPU in use, so the smaller CPU config (about 30 minutes on 2 cores)"))
    set_threads(args.threads)
    cfg = build_config(args)
    # --data's ids are another tokenizer's: the model trained on them has its vocabulary ("ours" has --data "")
    data_tokenizer = load_data_tokenizer(args.data_tokenizer) if args.data and args.data_tokenizer else None
    if data_tokenizer:
        cfg = cfg.with_overrides([f"vocab_size={data_tokenizer[0].get_vocab_size()}"])
    if dry_run(args, cfg):
        return
    tokenizer_dir = args.tokenizer or os.path.join(args.out_dir, "tokenizer")
    cache_dir = args.cache_dir or os.path.join(args.out_dir, "cache")
    if args.dataset == "fineweb-edu":
        if args.data_dir or args.train_file or args.val_file:
            raise ValueError("--data-dir/--train-file/--val-file are TinyStories files; for fineweb-edu use --data-files")
        task = data_fineweb.FineWebTask(cfg, tokenizer_dir, data_fineweb.source_from_args(args), args.val_docs)
    else:
        if args.data_files:
            raise ValueError("--data-files is for --dataset fineweb-edu; TinyStories takes --data-dir or --train-file/--val-file")
        train_source, val_source = sources_from_args(args)
        if args.data:  # your batches (and tokenizer, with --data-tokenizer); our held-out text and scores
            rows = RowStream(args.data, parse_kwargs(args.data_kwargs), cfg.spec_paths.split(os.pathsep) if cfg.spec_paths
                             else (), cfg.max_position_embeddings)
            task = UserDataTask(cfg, tokenizer_dir, train_source, val_source, cache_dir, rows, data_tokenizer)
        else:
            task = TinyStoriesTask(cfg, tokenizer_dir, train_source, val_source, cache_dir)

    def summarize(result):
        final = result["final"]
        return {"experiment": args.dataset, "preset": args.preset, "quant": cfg.quant,
                "inject_bug": cfg.inject_bug, "n_params": result["n_params"], "steps": final["step"],
                "elapsed_s": result["elapsed_s"], "tokens_per_s": result["tokens_per_s"],
                "val_loss": final["val_loss"], "bits_per_byte": final["bits_per_byte"],
                "train_loss_eval": final["train_loss_eval"], "val_loss_start": result["history"][0]["val_loss"],
                "data": task.sources, "final": final, "stories": task.last_samples}

    def report(s):
        print(f"\n=== {s['experiment']}, {s['quant']}, {s['n_params'] / 1e6:.2f}M params, {s['steps']} steps, "
              f"{s['elapsed_s'] / 60:.1f} min, {s['tokens_per_s']:,.0f} tokens/s ===")
        print(task.format_eval(s["final"]))
        print(f"val loss {s['val_loss_start']:.3f} at step 0 -> {s['val_loss']:.4f}; "
              f"val - train gap {s['val_loss'] - s['train_loss_eval']:+.4f} (growing = over-fitting)")
        for story in s["stories"]:
            print(f"\n{story}")

    run_experiment(args, cfg, task, os.path.abspath(__file__), summarize, report,
                   child_args=["--tokenizer", tokenizer_dir, "--cache-dir", cache_dir])  # twin/data runs share both


if __name__ == "__main__":
    run_main(main)
