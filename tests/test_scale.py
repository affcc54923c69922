"""The scale-up path on CPU: torchrun data parallel (gloo, 2 processes) gives the loss of one
process on the same global batch, resume works under it, gradient accumulation changes nothing
but memory, the planner's figures match a real model and a measured run, and the live MFU."""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from bitnet import distributed, plan
from bitnet.config_tiny import PRESETS, BitNetConfigArithmetic
from bitnet.data_arithmetic import ArithmeticTask
from bitnet.model import BitNetForCausalLM
from bitnet.checkpoint import load_checkpoint
from bitnet.trainer import train
from conftest import assert_dicts_close

TIMING_KEYS = ("tokens_per_s", "elapsed_s", "mfu")


def read_log(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def assert_same_log(a_dir, b_dir, rel=1e-5):
    """Every logged number within `rel`; the gradient norm within 1e-4: summed over other
    micro-batch splits it moved 2.8e-5 at step 20 on an Intel Xeon (AVX-512) while the loss
    agreed to 1e-6, as fp32 sums in another order do."""
    a, b = read_log(a_dir), read_log(b_dir)
    assert [(e["kind"], e["step"]) for e in a] == [(e["kind"], e["step"]) for e in b]
    for ea, eb in zip(a, b):
        assert_dicts_close({k: v for k, v in ea.items() if k != "grad_norm"},
                           {k: v for k, v in eb.items() if k != "grad_norm"}, rel=rel)
        if "grad_norm" in ea:
            assert ea["grad_norm"] == pytest.approx(eb["grad_norm"], rel=1e-4), ea["step"]


def assert_same_weights(a_dir, b_dir):
    sa, sb = load_checkpoint(a_dir)["model"], load_checkpoint(b_dir)["model"]
    for k in sa:
        # Adam turns float-rounding noise in near-zero gradients into ~1e-6 steps; a wrong
        # gradient moves weights by ~lr = 5e-3
        assert torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-5), k


@pytest.fixture
def dp_cfg(arith_cfg):
    # Flat after warmup, so a 10-step run is the first half of a 20-step one (resume to more steps).
    # The full-precision twin: in the ternary model a 1e-7 difference in the order of a float sum
    # (the gradient all-reduce) can flip an int8 activation or a ternary weight across its rounding
    # boundary, which moves the loss by ~1e-4; the fp model shows whether the plumbing is exact.
    return arith_cfg(max_steps=20, eval_interval=10, warmup_steps=3, min_lr_ratio=1.0, batch_size=16,
                     eval_problems=8, quant="none")


def tracked_train(cfg, out_dir, **kw):
    """train() as the train scripts call it (with the quantization-health hook for a ternary model)."""
    from bitnet.diagnose import QuantHealthTracker

    task = ArithmeticTask(cfg)
    tracker = QuantHealthTracker(lambda: task.get_batch(0, 8)) if cfg.quant == "ternary" else None
    return train(cfg, task, str(out_dir), device="cpu", quiet=True, on_eval=tracker, **kw)


def ddp_worker(rank, world_size, port, cfg, out_dir):
    """One process of a gloo job, joined the way torchrun joins it (env://)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tracked_train(cfg, out_dir)
    torch.distributed.destroy_process_group()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(repo_root, cfg, out_dir, *extra, nproc=2):
    """train_bitnet_arithmetic.py under torchrun with `cfg` spelled out as --set overrides."""
    defaults = asdict(BitNetConfigArithmetic())
    sets = [f"--set={k}={v}" for k, v in asdict(cfg).items() if v != defaults[k] and k not in ("quant", "inject_bug")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(repo_root, "train_bitnet_arithmetic.py"), "--preset", "arithmetic", "--device", "cpu",
           "--threads", "1", "--quiet", "--no-verdict", "--out-dir", str(out_dir), *sets, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_processes_give_the_loss_of_one_and_resume_under_torchrun(repo_root, dp_cfg, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    tracked_train(dp_cfg, one)
    # steps 1-10: 2 gloo processes x 8 rows, joined as torchrun joins them
    half = dp_cfg.with_overrides(["max_steps=10"])
    torch.multiprocessing.start_processes(ddp_worker, args=(2, free_port(), half, two), nprocs=2,
                                          start_method="spawn")
    assert load_checkpoint(str(two))["step"] == 10
    # steps 11-20: resumed by the train script under torchrun, as 2 processes x 2 micro-batches of 4
    torchrun(repo_root, dp_cfg, two, "--resume", "--quant", "none", "--set", "grad_accum_steps=2")
    assert_same_log(one, two)  # every logged train loss and evaluation, within 1e-5
    assert_same_weights(one, two)
    with open(two / "summary.json") as f:  # rank 0 wrote it
        assert json.load(f)["steps"] == 20


def test_gradient_accumulation_changes_nothing_but_memory(dp_cfg, tmp_path):
    # answer-only loss: rows hold different numbers of labelled tokens, so the micro-batches are
    # weighted by their labelled tokens, not averaged
    for accum in (1, 4):
        cfg = dp_cfg.with_overrides([f"grad_accum_steps={accum}", "max_steps=10"])
        train(cfg, ArithmeticTask(cfg), str(tmp_path / f"accum{accum}"), device="cpu", quiet=True)
    assert_same_log(tmp_path / "accum1", tmp_path / "accum4")
    assert_same_weights(tmp_path / "accum1", tmp_path / "accum4")


@pytest.mark.parametrize("batch, accum, world", [(10, 4, 1), (16, 3, 1), (8, 1, 16), (4, 0, 1)])
def test_a_global_batch_that_does_not_split_is_a_one_line_error(arith_cfg, batch, accum, world):
    with pytest.raises(ValueError) as e:
        distributed.micro_batch_rows(arith_cfg(batch_size=batch, grad_accum_steps=accum), world)
    assert "\n" not in str(e.value) and "grad_accum_steps" in str(e.value)


def test_ranks_cut_the_global_batch_and_micro_batches_weigh_their_labels(arith_cfg):
    cfg = arith_cfg(batch_size=12, grad_accum_steps=3)
    task = ArithmeticTask(cfg)
    x, y = task.get_batch(7, 12)
    rows = [distributed.rank_batch(task, 7, cfg, distributed.DistContext(r, 3, torch.device("cpu"))) for r in range(3)]
    assert torch.equal(torch.cat([r[0] for r in rows]), x) and torch.equal(torch.cat([r[1] for r in rows]), y)
    micro = distributed.micro_batches(task, 7, cfg, distributed.DistContext(0, 1, torch.device("cpu")))
    assert [len(m[0]) for m in micro] == [4, 4, 4]
    labels = [int((m[1] != -100).sum()) for m in micro]
    assert len(set(labels)) > 1  # the case that needs weights: unequal labelled tokens
    assert [m[2] for m in micro] == pytest.approx([n / sum(labels) for n in labels])
    one = distributed.micro_batches(task, 7, cfg.with_overrides(["grad_accum_steps=1"]),
                                    distributed.DistContext(0, 1, torch.device("cpu")))
    assert len(one) == 1 and one[0][2] == 1.0  # one process, one micro-batch: exactly the old step


# ---------------------------------------------------------------- planner
@pytest.mark.parametrize("name", ["arithmetic-cpu", "tiny-cpu"])
def test_planned_parameters_and_flops_match_the_real_model(name):
    cfg = PRESETS[name]()
    real = BitNetForCausalLM(cfg)
    fake, _ = plan.fake_model(cfg)
    assert fake.num_parameters() == real.num_parameters()
    emb = real.model.embed_tokens.weight.numel()
    n_matmul = sum(p.numel() for n, p in real.named_parameters() if n != "model.embed_tokens.weight")
    if cfg.tie_word_embeddings:
        n_matmul += emb
    T, L, d = cfg.max_position_embeddings, cfg.num_hidden_layers, cfg.hidden_size
    assert plan.flops_per_token(real) == 6 * n_matmul + 12 * L * d * T


@pytest.mark.parametrize("name, total_m, non_embedding_m", [("95m", 95.4, 70.8), ("200m", 212.7, 179.9)])
def test_scale_presets_are_the_sizes_they_claim_with_a_32k_vocab(name, total_m, non_embedding_m):
    cfg = PRESETS[name]()
    model, _ = plan.fake_model(cfg)  # nothing allocated
    assert cfg.vocab_size == 32000
    assert model.num_parameters() / 1e6 == pytest.approx(total_m, abs=0.1)
    assert model.num_parameters(exclude_embeddings=True) / 1e6 == pytest.approx(non_embedding_m, abs=0.1)


MEASURE = r"""
import ctypes, json, sys
import torch
from bitnet.config_tiny import PRESETS
from bitnet.model import BitNetForCausalLM
from bitnet.build import autocast_for, make_optimizer

torch.set_num_threads(1)
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD 64 KiB: a freed tensor goes back to the OS

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

def steps(cfg, rows, n=2):
    dev = torch.device("cpu")
    model, amp = BitNetForCausalLM(cfg), autocast_for(dev, cfg.dtype)
    opt = make_optimizer(model, cfg, dev)
    x = torch.randint(0, cfg.vocab_size, (rows, cfg.max_position_embeddings))
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        with amp:
            _, loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

name, rows, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
steps(PRESETS[name](dtype=dtype, num_hidden_layers=1, max_position_embeddings=16), 1)  # load the kernels first
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident size (VmHWM) to the current one
base = status("VmRSS:")
steps(PRESETS[name](dtype=dtype), rows)
print(json.dumps({"peak": status("VmHWM:") - base}))
"""


def measured_peak(name: str, rows: int, dtype: str) -> int:
    """Peak memory of two real training steps on this CPU: the rise of the process's peak resident
    set (VmHWM) over its size before the model was built. glibc is told to give every freed block
    of 64 KiB or more back to the OS at once, so the resident set follows live tensors; a warm-up
    step of a 1-layer model first loads the kernels, whose code would otherwise count."""
    r = subprocess.run([sys.executable, "-c", MEASURE, name, str(rows), dtype], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])["peak"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak memory")
def test_memory_estimate_is_within_20_percent_of_a_measured_cpu_run():
    cfg = PRESETS["tiny-cpu"](dtype="fp32")
    est = plan.memory_estimate(cfg, cfg.batch_size, target="cpu")
    measured = measured_peak("tiny-cpu", cfg.batch_size, "fp32")
    assert est["peak"] == pytest.approx(measured, rel=0.2), (est, measured)
    n = BitNetForCausalLM(cfg).num_parameters()
    assert (est["weights"], est["gradients"], est["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert est["activations"] > est["weights"]  # at batch 4 x 256 tokens activations dominate


def test_dry_run_prints_one_json_line_and_builds_nothing(repo_root, tmp_path):
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, os.path.join(repo_root, "train_bitnet_tiny.py"), "--preset", "tiny",
                        "--out-dir", str(out), "--dry-run", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    p = json.loads(lines[0])
    cfg = PRESETS["tiny"]()
    assert p["params"] == BitNetForCausalLM(cfg).num_parameters()
    assert p["params_embedding"] + p["params_non_embedding"] == p["params"]
    assert p["tokens_per_step"] == cfg.batch_size * cfg.max_position_embeddings
    assert p["micro_batch_rows"] == cfg.batch_size // 4 and p["world_size"] == 4
    hours = p["tokens_total"] * p["flops_per_token"] / (4 * 989.4e12 * p["assumed_mfu"]) / 3600
    assert p["wall_hours"]["H100"] == pytest.approx(hours, rel=1e-2)
    assert set(p["memory_gib"]) == {"weights", "optimizer", "gradients", "activations", "peak"}
    assert not out.exists()  # nothing real: no folder, no tokenizer, no data
    bad = subprocess.run([sys.executable, os.path.join(repo_root, "train_bitnet_tiny.py"), "--preset", "tiny",
                          "--out-dir", str(out), "--dry-run", "3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "multiple of world_size 3" in bad.stderr and "Traceback" not in bad.stderr


def test_mfu_is_logged_from_the_stated_peak(arith_cfg, tmp_path):
    cfg = arith_cfg(max_steps=10, eval_interval=10, eval_problems=4, peak_tflops=0.5)
    r = train(cfg, ArithmeticTask(cfg), str(tmp_path), device="cpu", quiet=True)
    with open(tmp_path / "metrics.jsonl") as f:
        entry = [e for e in map(json.loads, f) if e["kind"] == "train"][-1]
    fpt = plan.flops_per_token(r["model"])
    assert entry["mfu"] == pytest.approx(entry["tokens_per_s"] * fpt / 0.5e12, rel=1e-9)
    assert plan.peak_flops(arith_cfg(), torch.device("cpu")) is None  # a CPU without a stated peak: n/a
    assert plan.mfu(1000.0, 6e6, None) is None
