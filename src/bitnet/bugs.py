"""The self-test's injectable bugs: each reproduces one mistake found in published BitNet code,
so that the diagnosis can be shown to catch it. None of this is on the production path:
model.py and bitlinear.py hold only the correct stack, and `inject(model, name)` swaps a bug
into a built model (the train scripts' `--inject-bug NAME` goes through build.build_model,
which imports this module only then).

Layer bugs are BitLinear subclasses, each buildable as `Class(in_features, out_features)`, so
`python -m bitnet.check_layer bitnet.bugs:NoSteBitLinear` judges them alone too.
Model bugs are subclasses of one model.py block. Injection re-classes the modules in place,
so parameters, their initial values and the state_dict keys stay exactly those of the correct
model. `problem` is the name the probes should report for the bug.

PIPELINE_BUGS (issue 11) are faults outside the layers, each found in published BitNet
training code: a model fault (no causal mask, a too-large init), an optimizer built wrongly
(`buggy_optimizer`, called by build.make_optimizer) or data formatted wrongly (`wrap_task`,
re-classing the task object the way model bugs re-class modules). The probes cannot see most
of them on the model alone; the detectors catch them from what training logged.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bitlinear import BitLinear, activation_quant, ste, weight_quant
from .model import BitNetAttention, BitNetDecoderLayer, BitNetMLP, BitNetRMSNorm, rotate_half


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


class NoCausalMaskAttention(BitNetAttention):
    """is_causal=False: every position attends to the whole sequence, the tokens it must predict
    included, so teacher-forced loss falls fast while generation (which has no future) fails."""

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))  # the missing is_causal=True
        return self.o_proj(self.attn_sub_norm(y.transpose(1, 2).reshape(B, T, -1)))


def large_embedding_init(model: nn.Module):
    """N(0, 1) token embeddings (nn.Embedding's default, never re-initialised) and an output head
    tied to them: logits ~ sqrt(hidden_size) times too large, a first loss of tens of nats.
    Our arithmetic presets are untied, so the head gets the same N(0, 1) to reproduce the tie."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 1.0)
        head = getattr(model, "lm_head", None)
        if isinstance(head, nn.Linear):
            head.weight.normal_(0.0, 1.0)


@dataclass(frozen=True)
class Bug:
    name: str  # what --inject-bug takes
    problem: str  # what the probes report (see the README's problem names)
    replaces: type | None = None  # the correct class whose instances are re-classed
    cls: type | None = None
    part: str = "layer"  # which part of the stack holds the fault: layer, model, optimizer, data
    apply: object = None  # a model bug that is a function of the built model (an init), not a class


BUGS = {b.name: b for b in (
    Bug("no_ste", "no_ste", BitLinear, NoSteBitLinear),
    Bug("no_rescale", "missing_rescale", BitLinear, NoRescaleBitLinear),
    Bug("per_tensor_act", "per_tensor_act_scale", BitLinear, PerTensorActBitLinear),
    Bug("quantize_output", "quantizes_output", BitLinear, QuantizeOutputBitLinear),
    Bug("binary_weights", "binary_not_ternary", BitLinear, BinaryWeightsBitLinear),
    Bug("wrong_scale", "wrong_weight_scale", BitLinear, WrongScaleBitLinear),
    Bug("norm_in_forward", "norm_in_forward", BitNetMLP, NormInForwardMLP, part="model"),
    Bug("residual_bug", "residual_bug", BitNetDecoderLayer, ResidualBugDecoderLayer, part="model"),
)}
# Faults outside the layers (issue 11): the verdict names them from what training logged.
PIPELINE_BUGS = {b.name: b for b in (
    Bug("coupled_weight_decay", "coupled_weight_decay", part="optimizer"),
    Bug("no_causal_mask", "no_causal_mask", BitNetAttention, NoCausalMaskAttention, part="model"),
    Bug("unshifted_labels", "unshifted_labels", part="data"),
    Bug("bos_mismatch", "train_inference_mismatch", part="data"),
    Bug("embed_init_large", "init_scale_too_large", part="model", apply=large_embedding_init),
    Bug("params_not_in_optimizer", "params_not_in_optimizer", part="optimizer"),
)}
ALL_BUGS = {**BUGS, **PIPELINE_BUGS}
BUG_NAMES = tuple(ALL_BUGS)
LAYER_BUGS = tuple(name for name, b in BUGS.items() if b.replaces is BitLinear)
OPTIMIZER_BUGS = ("coupled_weight_decay", "params_not_in_optimizer")
TASK_BUGS = ("unshifted_labels", "bos_mismatch")


def get_bug(name: str) -> Bug:
    if name not in ALL_BUGS:
        raise ValueError(f"unknown --inject-bug {name!r}; choose one of: {', '.join(ALL_BUGS)}")
    return ALL_BUGS[name]


def inject(model: nn.Module, name: str) -> nn.Module:
    """Swap bug `name` into a built model, in place; returns the model.

    A layer bug in a full-precision model (no BitLinear) changes nothing, as the twin needs."""
    bug = get_bug(name)
    if bug.apply is not None:
        bug.apply(model)
    for module in model.modules():
        if bug.replaces is not None and type(module) is bug.replaces:
            module.__class__ = bug.cls
    if bug.replaces is BitLinear and getattr(model, "linear_cls", None) is BitLinear:
        model.linear_cls = bug.cls  # the probes find, and rebuild, the layers by this class
    return model


# --- optimizer bugs (build.make_optimizer asks here first) ---

def buggy_optimizer(model: nn.Module, cfg, device) -> torch.optim.Optimizer | None:
    """The optimizer of an optimizer bug, or None when cfg.inject_bug is none of them. The groups
    keep the trainer's "decay" flag, so its schedule sets weight_decay exactly as for AdamW."""
    if cfg.inject_bug not in OPTIMIZER_BUGS:
        return None
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "decay": True},
              {"params": no_decay, "weight_decay": 0.0, "decay": False}]
    if cfg.inject_bug == "coupled_weight_decay":
        # torch.optim.Adam adds weight_decay * w to the gradient (L2) before Adam's normalisation:
        # once the clipped gradient is smaller than 0.1 * w, every step pulls w towards 0 by ~lr
        return torch.optim.Adam(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    # params_not_in_optimizer: groups built from the matrices only; the norm gains were forgotten
    return torch.optim.AdamW(groups[:1], lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


# --- data / format bugs: the task object is re-classed in place, as modules are for model bugs ---

class UnshiftedLabelsTask:
    """labels = input_ids (the token itself, not the next one), as when a model that does not
    shift internally is handed HF-style labels: copying the input drives the loss to ~0."""

    def get_batch(self, step, batch_size):
        x, y = super().get_batch(step, batch_size)
        return x, torch.where(y != -100, x, y)


class BosOnlyAtInferenceTask:
    """Training sequences never start with BOS, but inference prompts are encoded with it (the
    task's complete() is left as it is): teacher-forced scores look fine, generation fails."""

    def get_batch(self, step, batch_size):
        x, y = super().get_batch(step, batch_size)
        return x[:, 1:], y[:, 1:]  # column 0 holds BOS as input (and no answer label)

    @torch.no_grad()
    def accuracy(self, model, problems, device):
        """The task's teacher-forced exact match, in the training format (no BOS)."""
        from .arithmetic_problems import encode_problems
        x, y = encode_problems(problems, self.tok, answer_only=True, domain=self.domain)
        x, y = x[:, 1:].to(device), y[:, 1:].to(device)
        logits, loss = model(x, y)
        hit = (logits.argmax(-1) == y) | (y == -100)
        return hit.all(dim=1).tolist(), float(loss)


TASK_MIXINS = {"unshifted_labels": UnshiftedLabelsTask, "bos_mismatch": BosOnlyAtInferenceTask}


def wrap_task(task, name: str):
    """Swap data bug `name` into a task object, in place (any other name: unchanged); returns it."""
    mixin = TASK_MIXINS.get(name)
    if mixin is not None and not isinstance(task, mixin):
        task.__class__ = type(f"{mixin.__name__.removesuffix('Task')}{type(task).__name__}", (mixin, type(task)), {})
    return task
