"""Checkpoint size, peak memory and CPU generation speed: latent fp32 against 2-bit packed.

    python bench/packed.py --checkpoint runs/arith --out runs/bench_packed [--tokens 64] [--reps 3]
    python bench/packed.py --shape tiny --out runs/bench_packed_tiny       # random init, TinyStories shape

One model, four ways to run it, each in a fresh subprocess (so peak RSS is that variant's own):
  latent ckpt.pt     what `generate --checkpoint RUN` does: fp32 BitLinear, weights re-quantized each call
  latent safetensors the online export (fp32 latent weights only, no optimizer state)
  packed unpack      the --packed export on PackedBitLinear: 2-bit weights unpacked to float per call
  packed int8        the same bytes, unpacked to int8 per call, int8 x int8 -> int32 (torch._int_mm)
Peak RSS is resource.getrusage(RUSAGE_SELF).ru_maxrss, read after the imports, after loading, and
after generating; the parent imports no torch, since a child's ru_maxrss starts at its parent's. Tokens/s: greedy generate (batch 1, no stop token) of --tokens tokens from a
16-token prompt; median of --reps, after one warm-up call.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

VARIANTS = {  # name -> (which folder, kernel for generate.load_for_inference)
    "latent ckpt.pt": ("run", "latent"),
    "latent safetensors": ("online", "latent"),
    "packed unpack": ("packed", "unpack"),
    "packed int8": ("packed", "int8"),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(path: str, kernel: str, tokens: int, reps: int, threads: int) -> dict:
    """Peak RSS of one variant in this fresh process: after imports, after loading, after generating."""
    import torch
    torch.set_num_threads(threads)
    from bitnet.generate import load_for_inference
    after_imports = peak_rss_mb()
    t0 = time.perf_counter()
    model, _, _ = load_for_inference(path, "cpu", kernel)
    load_s = time.perf_counter() - t0
    after_load = peak_rss_mb()
    out = model.generate(prompt_for(model), tokens)
    return {"rss_imports_mb": after_imports, "rss_loaded_mb": after_load, "rss_peak_mb": peak_rss_mb(),
            "load_s": load_s, "tokens": out[0, 16:].tolist()}


def prompt_for(model):
    import torch
    return torch.randint(4, min(32, model.config.vocab_size), (1, 16), generator=torch.Generator().manual_seed(0))


def speed(folders: dict, tokens: int, reps: int, threads: int) -> dict:
    """Tokens/s of every variant, timed back to back in each repetition (one process), so a
    shared machine slows all of them alike; medians over the repetitions."""
    import torch
    torch.set_num_threads(threads)
    from bitnet.generate import load_for_inference
    models = {name: load_for_inference(folders[folder], "cpu", kernel)[0] for name, (folder, kernel) in VARIANTS.items()}
    times = {name: [] for name in models}
    for name, model in models.items():
        model.generate(prompt_for(model), 4)  # warm-up
    for _ in range(reps):
        for name, model in models.items():
            t0 = time.perf_counter()
            model.generate(prompt_for(model), tokens)
            times[name].append(time.perf_counter() - t0)
    base = times["latent ckpt.pt"]
    return {name: {"tokens_per_s": tokens / statistics.median(t),
                   "speedup_vs_latent": statistics.median(b / x for b, x in zip(base, t))} for name, t in times.items()}


def linear_bytes(model, packed: bool) -> int:
    import torch
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    if packed:  # uint8 [ceil(out/4), in] + one fp32 scale
        return sum(-(-m.out_features // 4) * m.in_features + 4 for m in layers)
    return sum(4 * m.weight.numel() for m in layers)


def make_synthetic_run(shape: str, run_dir: str) -> str:
    """A random-init model of a preset's shape, saved like a run (model only, no optimizer)."""
    from dataclasses import asdict

    import torch

    from bitnet.config_tiny import PRESETS, BitNetConfigArithmetic
    from bitnet.arithmetic_codec import CharTokenizer
    from bitnet.model import BitNetForCausalLM
    from bitnet.checkpoint import save_checkpoint
    p = PRESETS[shape]()
    cfg = BitNetConfigArithmetic(hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                                 num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
                                 num_key_value_heads=p.num_key_value_heads,
                                 max_position_embeddings=p.max_position_embeddings, dtype="fp32")
    torch.manual_seed(0)
    model = BitNetForCausalLM(cfg)
    os.makedirs(run_dir, exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "config": asdict(cfg), "config_class": type(cfg).__name__,
                     "task": {"task": "arithmetic", "tokenizer": CharTokenizer.identity}, "step": 0},
                    os.path.join(run_dir, "ckpt.pt"), keep_previous=False)
    return run_dir


def prepare(checkpoint: str | None, shape: str | None, out: str) -> dict:
    """The exports and their sizes (run in a subprocess of its own, like the measurements)."""
    from bitnet.export import WEIGHTS, export
    from bitnet.checkpoint import load_checkpoint, model_from_checkpoint
    from bitnet.rundir import CKPT_NAME
    run = checkpoint or make_synthetic_run(shape, os.path.join(out, "run"))
    folders = {"run": run, "online": export(run, os.path.join(out, "online")),
               "packed": export(run, os.path.join(out, "packed"), packed=True)}
    model = model_from_checkpoint(load_checkpoint(run))
    sizes = {"ckpt.pt": os.path.getsize(os.path.join(run, CKPT_NAME)),
             "online model.safetensors": os.path.getsize(os.path.join(folders["online"], WEIGHTS)),
             "packed model.safetensors": os.path.getsize(os.path.join(folders["packed"], WEIGHTS)),
             "linear weights fp32": linear_bytes(model, False), "linear weights packed": linear_bytes(model, True)}
    return {"model": run, "params": model.num_parameters(), "sizes": sizes, "folders": folders}


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a trained run (OUT_DIR with ckpt.pt)")
    src.add_argument("--shape", help="a preset name: random-init model of its shape, 32-token vocabulary")
    src.add_argument("--child", nargs=2, metavar=("PATH", "KERNEL"), help=argparse.SUPPRESS)
    src.add_argument("--speed", metavar="FOLDERS_JSON", help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help="folder for the exports and results.json")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.tokens, args.reps, args.threads)))
        return
    if args.speed:
        print(json.dumps(speed(json.loads(args.speed), args.tokens, args.reps, args.threads)))
        return
    if not args.out:
        p.error("--out is required")
    if args.prepare:
        print(json.dumps(prepare(args.checkpoint, args.shape, args.out)))
        return
    # This process imports no torch: a child's ru_maxrss starts from its parent's peak at fork.
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}

    def run(*extra) -> dict:
        r = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True, env=env, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])

    source = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--shape", args.shape]
    results = run(*source, "--out", args.out, "--prepare")
    common = ["--tokens", str(args.tokens), "--reps", str(args.reps), "--threads", str(args.threads)]
    results["variants"] = {name: run("--child", results["folders"][folder], kernel, *common)
                           for name, (folder, kernel) in VARIANTS.items()}
    for name, v in run("--speed", json.dumps(results["folders"]), *common).items():
        results["variants"][name].update(v)
    results["load_average"] = os.getloadavg()
    sizes, base = results["sizes"], results["variants"]["latent ckpt.pt"]["tokens"]
    print(f"model {results['model']}: {results['params'] / 1e6:.2f}M parameters")
    for k, v in sizes.items():
        print(f"  {k:26s} {v / 1e6:9.3f} MB")
    print(f"  linear weights packed / fp32 = 1/{sizes['linear weights fp32'] / sizes['linear weights packed']:.1f}")
    print(f"load average during the run: {' '.join(f'{x:.1f}' for x in results['load_average'])}")
    print("| variant | peak RSS after imports / load / generate (MB) | load s | tokens/s | speed vs latent | tokens equal to latent |")
    print("|---|---|---|---|---|---|")
    for name, v in results["variants"].items():
        print(f"| {name} | {v['rss_imports_mb']:.0f} / {v['rss_loaded_mb']:.0f} / {v['rss_peak_mb']:.0f} | "
              f"{v['load_s']:.2f} | {v['tokens_per_s']:.1f} | {v['speedup_vs_latent']:.2f}x | "
              f"{same_prefix(v['tokens'], base)}/{len(base)} |")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
