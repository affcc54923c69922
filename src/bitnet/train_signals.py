"""What the training loop logs at each evaluation for the pipeline detectors (diagnose/detectors.py):
weight RMS, the first and running train loss, the optimizer's type and decay, and the parameters
that never moved. It reads parameters and param_groups only, so any nn.Module and torch optimizer."""
import torch
import torch.nn as nn


def params_missing_from_optimizer(model: nn.Module, optimizer) -> list[str]:
    """Names of trainable parameters that are in none of the optimizer's param_groups: they get
    gradients and never move."""
    given = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in given]


def describe_optimizer(model: nn.Module, optimizer) -> dict:
    """Type and weight decay of any torch optimizer, read from its class and param_groups.

    Decay is *decoupled* (AdamW: w -= lr*wd*w outside the adaptive step) only for the AdamW
    family; torch.optim.Adam/SGD/RMSprop with weight_decay add wd*w to the gradient (L2)."""
    name = type(optimizer).__name__
    decays = [float(g.get("weight_decay", 0.0) or 0.0) for g in optimizer.param_groups]
    missing = params_missing_from_optimizer(model, optimizer)
    return {"type": name, "decoupled_weight_decay": "adamw" in name.lower() or bool(
                any(g.get("decoupled_weight_decay") for g in optimizer.param_groups)),
            "max_weight_decay": max(decays, default=0.0),
            "params_not_in_optimizer": missing[:10], "n_params_not_in_optimizer": len(missing)}


def _fingerprint(p: torch.Tensor) -> tuple[float, float]:
    """Sum and sum of squares in float64: any real update changes them (storing a copy of every
    parameter would double the model's memory)."""
    t = p.detach().double()
    return float(t.sum()), float(t.square().sum())


class TrainingSignals:
    """What the pipeline detectors read, logged into every evaluation entry by trainer.train():

      weight_rms        median over the >= 2-D parameters of each one's RMS (coupled decay
                        drives every one of them towards 0 together)
      first_train_loss  the first training step's loss, train_loss its running mean (None before)
      optimizer         describe_optimizer(): type, decay, parameters missing from its groups
      params_unchanged  trainable parameters bit-identical to step 0 (at step 0: None, not judged)

    `start`: the step-0 fingerprints a resumed run kept in its checkpoint (else taken now), so a
    resumed run logs what an uninterrupted one would. Works on any nn.Module and torch optimizer:
    parameters and param_groups only."""

    def __init__(self, model: nn.Module, optimizer, start: dict | None = None):
        self.optimizer = optimizer
        self.start = ({n: tuple(v) for n, v in start.items()} if start else
                      {n: _fingerprint(p) for n, p in model.named_parameters() if p.requires_grad})

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int, first_train_loss: float | None, train_loss: float | None) -> dict:
        rms = sorted(float(p.detach().float().square().mean().sqrt()) for p in model.parameters() if p.dim() >= 2)
        unchanged = None
        if step > 0:
            unchanged = [n for n, p in model.named_parameters() if n in self.start and _fingerprint(p) == self.start[n]]
        return {"weight_rms": rms[len(rms) // 2] if rms else None, "first_train_loss": first_train_loss,
                "train_loss": train_loss, "optimizer": describe_optimizer(model, self.optimizer),
                "params_unchanged": unchanged}
