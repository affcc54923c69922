"""Data parallel training under torchrun, on one code path with the single-process run.

    torchrun --standalone --nproc_per_node 4 train_bitnet_tiny.py --preset 95m --out-dir runs/95m ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. Without them a run is one process and nothing
here changes what the trainer does (every helper is then the identity, weights are exactly 1).
With them every process builds the same model from the same seed, DDP averages the gradients,
and each process trains on its own rows of the global batch.

The config states the global batch: batch_size sequences per optimizer step over all processes
and all micro-batches, so a preset means the same run on 1 GPU or 8. Rows per micro-batch =
batch_size / (world_size * grad_accum_steps).

Every process evaluates (the same model on the same data, so they stay in step and none waits
on a collective); only rank 0 logs, writes metrics and checkpoints and prints samples.
"""
import atexit
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain single process (readable before setup())."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: torch.device) -> DistContext:
    """Join the torchrun job if there is one (NCCL on CUDA, gloo on CPU); a no-op for one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext(0, 1, device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                             f"use --nproc_per_node {torch.cuda.device_count()} or fewer")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP for many processes (gradients as views of its buckets: no second copy); else the model."""
    if ctx.world_size == 1:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def grad_sync(model: torch.nn.Module, sync: bool):
    """DDP all-reduces gradients during backward; skip that on all but a step's last micro-batch."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def sum_over_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.world_size > 1:
        value = value.to(ctx.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def max_over_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The largest value over all processes (the time budget's plan and stop must agree)."""
    if ctx.world_size > 1:
        value = value.to(ctx.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_agree(flag: bool, ctx: DistContext) -> bool:
    """`flag` on any process, for every process: a checkpoint or a stop is a collective under
    torchrun, so one process deciding alone (its own clock, its own signal) would hang the rest."""
    if ctx.world_size == 1:
        return flag
    return bool(max_over_ranks(torch.tensor(float(flag)), ctx))


def micro_batch_rows(cfg, world_size: int) -> int:
    """Sequences per micro-batch, with a one-line error when the global batch does not split evenly."""
    accum = cfg.grad_accum_steps
    if accum < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {accum}")
    rows, left = divmod(cfg.batch_size, world_size * accum)
    if rows == 0 or left:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must be a multiple of world_size {world_size} "
                         f"x grad_accum_steps {accum}; change --set batch_size=N or --set grad_accum_steps=N")
    return rows


def rank_batch(task, step: int, cfg, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's rows of step `step`'s global batch. A task that streams its own shard of the
    data (get_rank_batch) hands them over itself; otherwise the global batch, a pure function of
    (seed, step), is built and cut by rank, so the union over processes is what one process sees."""
    rows = cfg.batch_size // ctx.world_size
    if hasattr(task, "get_rank_batch"):
        return task.get_rank_batch(step, rows, ctx.rank, ctx.world_size)
    x, y = task.get_batch(step, cfg.batch_size)
    lo = ctx.rank * rows
    return x[lo:lo + rows], y[lo:lo + rows]


def micro_batches(task, step: int, cfg, ctx: DistContext) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """[(x, y, share)] for this process's micro-batches of one optimizer step.

    share = the micro-batch's labelled tokens / the global batch's. Its mean loss times share,
    summed over micro-batches and processes, is the mean loss over every labelled token of the
    global batch: the objective of one process on the whole batch, even where rows carry
    different numbers of labels (the arithmetic task's answer-only loss). One process, one
    micro-batch: share is exactly 1.
    """
    rows = micro_batch_rows(cfg, ctx.world_size)
    x, y = rank_batch(task, step, cfg, ctx)
    labelled = [int((y[i:i + rows] != -100).sum()) for i in range(0, len(x), rows)]
    total = int(sum_over_ranks(torch.tensor(sum(labelled)), ctx)) if ctx.world_size > 1 else sum(labelled)
    return [(x[i:i + rows], y[i:i + rows], n / max(1, total)) for i, n in zip(range(0, len(x), rows), labelled)]


def gather_task_state(task, ctx: DistContext):
    """A streaming task's position on every process (a list by rank), for the checkpoint; None for
    tasks whose batches are a pure function of (seed, step). Under DDP a collective: every process
    must call it, so call it where every process checkpoints."""
    if not hasattr(task, "state_dict"):
        return None
    state = task.state_dict()
    if ctx.world_size == 1:
        return [state]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def restore_task_state(task, states, ctx: DistContext):
    if not hasattr(task, "load_state_dict"):
        return
    if states is None:
        raise ValueError("--resume: the checkpoint holds no data-stream position for this streaming dataset; "
                         "start a new --out-dir")
    if len(states) != ctx.world_size:
        raise ValueError(f"--resume: the checkpoint's data stream was split over {len(states)} process(es), this run "
                         f"has {ctx.world_size}; resume with torchrun --nproc_per_node {len(states)}")
    task.load_state_dict(states[ctx.rank])
