"""What a preset costs before it runs: parameters, FLOPs, memory and wall time (`--dry-run`),
and the live MFU figure of the trainer.

    python train_bitnet_tiny.py --preset 200m --out-dir runs/200m --dry-run

The model is built under FakeTensorMode (tensors with shapes, dtypes and a device label on meta
storage: nothing is allocated), and two of the trainer's steps run on it while LiveBytes counts
every storage alive. So the memory figures come from the model's and the optimizer's own code (every
copy BitLinear's quantizers make included), not from a formula that drifts from it.

FLOPs per token: 6N + 12 L d T (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B), where
N counts the weights that multiply (every parameter except the embedding table, plus lm_head even
when it is tied to the table), L layers, d = heads x head_dim, T the context. The 12 L d T term is
attention's QK^T and AV for a full (not causal-halved) T x T, as PaLM counts it. BitLinear's
quantizers add elementwise work that counts no FLOPs: that is part of why MFU is lower here.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .build import make_optimizer
from .distributed import micro_batch_rows
from .model import BitNetForCausalLM

# Peak dense (no 2:4 sparsity) bf16 tensor-core TFLOPS with fp32 accumulation, by a substring of
# torch.cuda.get_device_name(); first match wins, so longer names come first.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,  # NVIDIA H100 datasheet: 1,513 with sparsity
    "H100": 989.4,       # NVIDIA H100 datasheet, SXM5: 1,979 with sparsity
    "H200": 989.4,       # NVIDIA H200 datasheet: 1,979 with sparsity (the H100 SXM's tensor cores)
    "A100": 312.0,       # NVIDIA A100 datasheet: BF16 tensor core 312 (624 with sparsity)
    "RTX 4090": 165.2,   # NVIDIA Ada GPU architecture whitepaper, FP32 accumulate
    "RTX 3090": 71.0,    # NVIDIA Ampere GA102 whitepaper, FP32 accumulate
    "RTX 3060": 25.5,    # GA102 whitepaper's GeForce rate (512 FLOP/clock/SM, fp32 accumulate) x 28 SMs x 1.777 GHz
}
PLAN_GPUS = ("H100", "A100", "RTX 3060")  # the wall times the dry run prints
ASSUMED_MFU = 0.30  # a stated guess for the wall times; replace it with the MFU metrics.jsonl measures


def peak_flops(cfg, device: torch.device) -> float | None:
    """The device's peak bf16 FLOP/s: cfg.peak_tflops if set, else the GPU looked up by name; None on
    a CPU or an unknown GPU (MFU is then n/a)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((t * 1e12 for key, t in PEAK_TFLOPS.items() if key in name), None)
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all processes' devices."""
    return None if peak is None else tokens_per_s * flops_per_token / (peak * world_size)


def matmul_params(model: BitNetForCausalLM) -> int:
    """N of 6N: every parameter but the embedding table, plus lm_head's matrix even when tied."""
    cfg = model.config
    return model.num_parameters(exclude_embeddings=True) + (cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0)


def flops_per_token(model: BitNetForCausalLM) -> int:
    """Training FLOPs per token (forward and backward): 6N + 12 L d T."""
    cfg = model.config
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * cfg.max_position_embeddings
    return 6 * matmul_params(model) + attention


def fake_model(cfg):
    """(model, fake mode): the model under FakeTensorMode, nothing allocated. Run it inside `mode`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        model = BitNetForCausalLM(cfg)
    return model, mode


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage alive, and their peak, as ops run: an allocator
    simulation that works on fake tensors. A storage is freed when the last tensor using it dies."""

    def __init__(self, tensors=()):
        super().__init__()
        self.users: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.live = self.peak = 0
        for t in tensors:  # storages made before the count began (the parameters)
            self._hold(t)

    def _hold(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.size:
            self.size[key], self.users[key] = storage.nbytes(), 0
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.users[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int):
        self.users[key] -= 1
        if self.users[key] == 0:
            self.live -= self.size.pop(key)
            del self.users[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._hold(t)
        return out


def memory_estimate(cfg, rows: int, target: str = "cuda") -> dict:
    """Peak training memory in bytes at `rows` sequences per micro-batch, by part, from one of the
    trainer's steps (autocast, micro-batches, clipping, AdamW) run on a fake model under LiveBytes,
    after a step on zero gradients has made the optimizer's moments (the steady state).

    peak: the most bytes alive at once; weights, optimizer, gradients: their sizes after a step;
    activations: what the last micro-batch's forward leaves alive for backward, beyond those.
    target "cuda" plans for a GPU (fused AdamW, as the trainer uses there); "cpu" for this machine.
    Not modelled: DDP's communication buffers (its gradients are views of its buckets), the CUDA
    caching allocator's fragmentation and the CUDA context (~0.5 GB).
    """
    model, mode = fake_model(cfg)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype != "fp32")  # as CUDA's: matmuls in bf16
    micro = min(2, cfg.grad_accum_steps)  # a second micro-batch shows the gradients living across them
    with mode:
        opt = make_optimizer(model, cfg, torch.device(target))
        ids = torch.zeros(rows, cfg.max_position_embeddings, dtype=torch.long)
        counter = LiveBytes(model.parameters())
        with counter:
            for p in model.parameters():  # a first step on zero gradients creates the optimizer moments
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
            for _ in range(micro):
                with amp:
                    _, loss = model(ids, ids)
                after_forward = counter.live
                loss.backward()
                del loss
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    gradients = sum(p.numel() * p.element_size() for p in params if p.grad is not None)
    optimizer = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0)
    grads_in_forward = gradients if micro > 1 else 0  # zero_grad(set_to_none) frees them before the forward
    return {"weights": weights, "optimizer": optimizer, "gradients": gradients,
            "activations": after_forward - weights - optimizer - grads_in_forward, "peak": counter.peak}


def dry_run(cfg, world_size: int = 1) -> dict:
    """The one-line plan `--dry-run` prints (memory is per process, at the configured micro-batch)."""
    rows = micro_batch_rows(cfg, world_size)
    model, mode = fake_model(cfg)
    total, embedding = model.num_parameters(), cfg.vocab_size * cfg.hidden_size
    fpt = flops_per_token(model)
    tokens_per_step = cfg.batch_size * cfg.max_position_embeddings
    run_flops = fpt * tokens_per_step * cfg.max_steps
    mem = memory_estimate(cfg, rows)
    gib = 2 ** 30
    return {
        "preset": type(cfg).__name__, "params": total, "params_embedding": embedding,
        "params_non_embedding": total - embedding, "tied_embeddings": cfg.tie_word_embeddings,
        "flops_per_token": fpt, "flops_per_token_6N": 6 * matmul_params(model),
        "tokens_per_step": tokens_per_step, "steps": cfg.max_steps, "tokens_total": tokens_per_step * cfg.max_steps,
        "world_size": world_size, "grad_accum_steps": cfg.grad_accum_steps, "micro_batch_rows": rows,
        "autocast": "fp32" if cfg.dtype == "fp32" else "bf16",
        "memory_gib": {k: round(v / gib, 3) for k, v in mem.items()},
        "assumed_mfu": ASSUMED_MFU,
        "peak_tflops_assumed": {g: PEAK_TFLOPS[g] for g in PLAN_GPUS},
        "wall_hours": {g: float(f"{run_flops / (world_size * PEAK_TFLOPS[g] * 1e12 * ASSUMED_MFU) / 3600:.3g}")
                       for g in PLAN_GPUS},
    }

