"""Watching one call of a layer: what its matmul receives, which modules run and which
parameters appear during forward(), and what it prints (kept out of our own output)."""
import contextlib
import io
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class MatmulCall:
    activation: torch.Tensor  # what the matmul multiplied, (..., in)
    weight: torch.Tensor  # as (out, in)
    output: torch.Tensor | None = None
    grad_output: torch.Tensor | None = None  # filled in by backward


@dataclass
class Observation:
    output: torch.Tensor
    calls: list = field(default_factory=list)
    strays: list = field(default_factory=list)  # (module, args) run in forward but not registered
    new_parameters: list = field(default_factory=list)
    printed: str = ""


@contextlib.contextmanager
def watch_matmuls(calls: list, in_features: int, out_features: int):
    """Record every F.linear / matmul whose operands look like (tokens, in) x weight."""
    originals = {"linear": F.linear, "matmul": torch.matmul, "tmatmul": torch.Tensor.matmul,
                 "dunder": torch.Tensor.__matmul__}

    def record(activation, weight_out_in, out):
        if (weight_out_in.dim() == 2 and tuple(weight_out_in.shape) == (out_features, in_features)
                and activation.shape[-1] == in_features and torch.is_tensor(out)):
            call = MatmulCall(activation.detach().clone(), weight_out_in.detach().clone(), out)
            if out.requires_grad:
                out.register_hook(lambda g: setattr(call, "grad_output", g.detach().clone()))
            calls.append(call)

    def linear(input, weight, bias=None):
        out = originals["linear"](input, weight, bias)
        record(input, weight, out)
        return out

    def matmul_with(original):
        def matmul(a, b, *args, **kwargs):
            out = original(a, b, *args, **kwargs)
            if torch.is_tensor(b) and b.dim() == 2:
                record(a, b.T, out)
            return out
        return matmul

    F.linear = linear
    torch.matmul = matmul_with(originals["matmul"])
    torch.Tensor.matmul = matmul_with(originals["tmatmul"])
    torch.Tensor.__matmul__ = matmul_with(originals["dunder"])
    try:
        yield calls
    finally:
        F.linear, torch.matmul = originals["linear"], originals["matmul"]
        torch.Tensor.matmul, torch.Tensor.__matmul__ = originals["tmatmul"], originals["dunder"]


@contextlib.contextmanager
def captured_stdout(sink: list):
    """Layers that print: keep their output out of our table and JSON line."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    sink.append(buf.getvalue())


def observe(layer: nn.Module, x: torch.Tensor, in_features: int, out_features: int,
            grad: torch.Tensor | None = None) -> Observation:
    """One forward (and backward of `grad`) of `layer` on x, watching matmuls and strays."""
    registered = {id(m) for m in layer.modules()}
    obs = Observation(output=None)
    printed = []

    def spot_stray(module, args):
        if id(module) not in registered:
            obs.strays.append((module, args))

    hooks = [nn.modules.module.register_module_forward_pre_hook(spot_stray),
             nn.modules.module.register_module_parameter_registration_hook(
                 lambda module, name, p: obs.new_parameters.append(f"{type(module).__name__}.{name}"))]
    try:
        with captured_stdout(printed), watch_matmuls(obs.calls, in_features, out_features):
            with torch.enable_grad() if grad is not None else torch.no_grad():
                y = layer(x)
                y = y[0] if isinstance(y, tuple) else y
                if grad is not None:
                    y.backward(grad)
    finally:
        for h in hooks:
            h.remove()
    obs.output, obs.printed = y.detach(), "".join(printed)
    return obs


def quiet_call(layer, x):
    with torch.no_grad(), captured_stdout([]):
        y = layer(x)
    return (y[0] if isinstance(y, tuple) else y).detach()
