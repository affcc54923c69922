"""The self-test's injectable bugs: each reproduces one mistake found in published BitNet code,
so that the diagnosis can be shown to catch it. None of this is on the production path:
model.py and bitlinear.py hold only the correct stack, and `inject(model, name)` swaps a bug
into a built model (the train scripts' `--inject-bug NAME` goes through trainer.build_model).

Layer bugs are BitLinear subclasses, each buildable as `Class(in_features, out_features)`, so
`python -m bitnet.check_layer bitnet.diagnose.bugs:NoSteBitLinear` judges them alone too.
Model bugs are subclasses of one model.py block. Injection re-classes the modules in place,
so parameters, their initial values and the state_dict keys stay exactly those of the correct
model. `problem` is the name the probes should report for the bug.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bitlinear import BitLinear, activation_quant, ste, weight_quant
from ..model import BitNetDecoderLayer, BitNetMLP, BitNetRMSNorm


class NoSteBitLinear(BitLinear):
    """Raw round() in the graph: its gradient is zero almost everywhere."""

    def forward(self, x):
        return F.linear(activation_quant(x), weight_quant(self.weight))


class NoRescaleBitLinear(BitLinear):
    """Ternary values never multiplied back by 1/s: the output is 1/mean|W| times too big."""

    def forward(self, x):
        scale = 1.0 / self.weight.abs().mean().clamp(min=1e-5)
        w = ste(self.weight, (self.weight * scale).round().clamp(-1, 1))
        return F.linear(ste(x, activation_quant(x)), w)


class PerTensorActBitLinear(BitLinear):
    """One activation scale for the whole tensor: one loud token coarsens every other one."""

    def forward(self, x):
        scale = 127.0 / x.abs().amax().clamp(min=1e-5)
        x_q = (x * scale).round().clamp(-128, 127) / scale
        return F.linear(ste(x, x_q), ste(self.weight, weight_quant(self.weight)))


class QuantizeOutputBitLinear(BitLinear):
    """The matmul runs on the raw input and its result is quantized instead."""

    def forward(self, x):
        y = F.linear(x, ste(self.weight, weight_quant(self.weight)))
        return ste(y, activation_quant(y))


class BinaryWeightsBitLinear(BitLinear):
    """sign(W) * mean|W|: binary (BitNet 1-bit), not ternary."""

    def forward(self, x):
        w_q = torch.where(self.weight >= 0, 1.0, -1.0).to(self.weight.dtype) * self.weight.abs().mean()
        return F.linear(ste(x, activation_quant(x)), ste(self.weight, w_q))


class WrongScaleBitLinear(BitLinear):
    """s = mean|W| where 1/mean|W| belongs: with small weights every W*s rounds to zero."""

    def forward(self, x):
        scale = self.weight.abs().mean().clamp(min=1e-5)
        w_q = (self.weight * scale).round().clamp(-1, 1) / scale
        return F.linear(ste(x, activation_quant(x)), ste(self.weight, w_q))


class NormInForwardMLP(BitNetMLP):
    """A fresh RMSNorm built in every forward(): its weight is never registered nor trained."""

    def forward(self, x):
        h = F.relu(self.gate_proj(x)).square() * self.up_proj(x)
        return self.down_proj(BitNetRMSNorm(h.shape[-1]).to(h.device)(h))


class ResidualBugDecoderLayer(BitNetDecoderLayer):
    """The block drops its input after attention: no residual path around self_attn."""

    def forward(self, x, cos, sin):
        x = self.dropout(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


@dataclass(frozen=True)
class Bug:
    name: str  # what --inject-bug takes
    problem: str  # what the probes report (see the README's problem names)
    replaces: type  # the correct class whose instances are re-classed
    cls: type


BUGS = {b.name: b for b in (
    Bug("no_ste", "no_ste", BitLinear, NoSteBitLinear),
    Bug("no_rescale", "missing_rescale", BitLinear, NoRescaleBitLinear),
    Bug("per_tensor_act", "per_tensor_act_scale", BitLinear, PerTensorActBitLinear),
    Bug("quantize_output", "quantizes_output", BitLinear, QuantizeOutputBitLinear),
    Bug("binary_weights", "binary_not_ternary", BitLinear, BinaryWeightsBitLinear),
    Bug("wrong_scale", "wrong_weight_scale", BitLinear, WrongScaleBitLinear),
    Bug("norm_in_forward", "norm_in_forward", BitNetMLP, NormInForwardMLP),
    Bug("residual_bug", "residual_bug", BitNetDecoderLayer, ResidualBugDecoderLayer),
)}
BUG_NAMES = tuple(BUGS)
LAYER_BUGS = tuple(name for name, b in BUGS.items() if b.replaces is BitLinear)


def get_bug(name: str) -> Bug:
    if name not in BUGS:
        raise ValueError(f"unknown --inject-bug {name!r}; choose one of: {', '.join(BUGS)}")
    return BUGS[name]


def inject(model: nn.Module, name: str) -> nn.Module:
    """Swap bug `name` into a built model, in place; returns the model.

    A layer bug in a full-precision model (no BitLinear) changes nothing, as the twin needs."""
    bug = get_bug(name)
    for module in model.modules():
        if type(module) is bug.replaces:
            module.__class__ = bug.cls
    if bug.replaces is BitLinear and getattr(model, "linear_cls", None) is BitLinear:
        model.linear_cls = bug.cls  # the probes find, and rebuild, the layers by this class
    return model
