"""Bring your own stack: a user's layer, model or optimizer inside our experiments.

    --linear SPEC      a class for every projection of our model, built as Class(in, out, bias=False)
                       when it takes `bias`, else Class(in, out); its weight gets our init.
    --model SPEC       a factory f(cfg) -> nn.Module mapping input_ids [B, T] (long) to logits [B, T, V]
                       (or to an object with .logits, or a tuple whose first item is the logits).
                       Wrapped in PluggedModel, which gives the trainer and the diagnosis what they
                       use of our model: forward(x, y) -> (logits, loss), .config, generate().
    --optimizer SPEC   a factory f(model, cfg) -> torch.optim.Optimizer in place of our AdamW; it gets
                       the user's own module (or ours under --linear alone), not the wrapper.

The twin (the same run with nn.Linear, quant="none") is, in this order of preference:
  - under --linear: our model with nn.Linear, exactly as without plug-ins;
  - under --model: the factory's own fp build, when it takes `linear_cls` (f(cfg, linear_cls=...)
    gets a bias-free nn.Linear builder) or honours cfg.quant="none" (no quantized layer in it);
  - else the user's model with each quantized layer swapped for an nn.Linear of the same shape
    (starting from the same initial weight), if the model still runs and returns the same shape;
  - else our own fp model, and the output says so: the comparison is then with another model.
The quantized layers are the model's `linear_cls` attribute if it has one (a class), else the
--linear class, else every module class (not nn.Linear itself) with a 2-D `weight` that is an
nn.Linear subclass or has "linear" in its name.
"""
import inspect
import os
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bitlinear import full_precision_linear
from .model import BitNetForCausalLM
from .spec import SpecError, resolve_spec

PART_FLAGS = {"layer": ("linear_spec", "--linear"), "model": ("model_spec", "--model"),
              "optimizer": ("optimizer_spec", "--optimizer")}
OUR_TWIN = "our model with nn.Linear"
NOT_APPLICABLE = "not applicable to a plugged-in model (it needs our decoder blocks)"


class PluggedError(ValueError):
    """The user's code cannot be used as given; one line naming the problem and the fix (exit 2)."""


def parts(cfg) -> dict[str, str]:
    """{"layer"|"model"|"optimizer": SPEC} for the parts of the run that are the user's."""
    return {part: getattr(cfg, field) for part, (field, _) in PART_FLAGS.items() if getattr(cfg, field, "")}


def shown(spec: str) -> str:
    """A SPEC as printed: a file under the working directory relative to it (the config keeps it absolute)."""
    target, _, name = spec.rpartition(":")
    if os.path.isabs(target) and target.startswith(os.getcwd() + os.sep):
        return f"{os.path.relpath(target)}:{name}"
    return spec


def spec_paths(cfg) -> list[str]:
    return [p for p in cfg.spec_paths.split(os.pathsep) if p]


def resolve(cfg, part: str):
    field, flag = PART_FLAGS[part]
    spec = getattr(cfg, field)
    try:
        obj = resolve_spec(spec, spec_paths(cfg))
    except SpecError as e:
        raise PluggedError(f"{flag} {shown(spec)}: {e}") from None
    if not callable(obj):
        raise PluggedError(f"{flag} {shown(spec)} is a {type(obj).__name__}, not a class or function; name a callable")
    return obj


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def logits_of_output(out) -> torch.Tensor:
    """Logits from what a user's forward returns: a tensor, an object with .logits, or a tuple."""
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out


# ----------------------------------------------------------------------------- the layer
def takes_keyword(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def linear_builder(cls, spec: str):
    """in, out -> a projection of the user's class: bias-free when the class lets us say so."""
    no_bias = {"bias": False} if takes_keyword(cls, "bias") else {}

    def build(in_features: int, out_features: int):
        try:
            return cls(in_features, out_features, **no_bias)
        except Exception as e:  # noqa: BLE001 - the user's constructor can fail in any way
            raise PluggedError(f"--linear {shown(spec)}: {cls.__name__}({in_features}, {out_features}"
                               f"{', bias=False' if no_bias else ''}) failed ({first_line(e)}); "
                               f"the class must build from (in_features, out_features)") from None
    return build


def our_model_with(cfg, cls) -> BitNetForCausalLM:
    """Our model with the user's class in every projection, initialised as our nn.Linear layers are,
    so that against its twin only the layer differs."""
    model = BitNetForCausalLM(cfg, linear_cls=linear_builder(cls, cfg.linear_spec))
    model.linear_cls = cls  # the probes and the health tracker find the quantized layers by this class
    give_shapes(model, cls)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, cls) and not isinstance(m, nn.Linear):  # nn.Linear subclasses got our init already
                for name, p in m.named_parameters(recurse=False):
                    if name == "weight" and p.dim() == 2:
                        nn.init.normal_(p, mean=0.0, std=cfg.initializer_range)
                    elif name == "bias":
                        nn.init.zeros_(p)
    return model


def quantized_classes(net: nn.Module, hint=None) -> tuple[type, ...]:
    """The classes of the user's quantized layers (see the module docstring for the rule)."""
    own = getattr(net, "linear_cls", None)
    if isinstance(own, type):
        return (own,)
    if isinstance(hint, type):
        return (hint,)
    found = []
    for m in net.modules():
        t, w = type(m), m._parameters.get("weight")
        if t in (nn.Linear, nn.Embedding) or w is None or w.dim() != 2:
            continue
        if issubclass(t, nn.Linear) or "linear" in t.__name__.lower():
            found.append(t)
    return tuple(dict.fromkeys(found))


def give_shapes(model: nn.Module, classes) -> None:
    """The probes and the health tracker read a layer's in_features/out_features: a user's layer that
    lacks them gets them from its [out, in] weight."""
    for m in model.modules():
        w = m._parameters.get("weight") if classes and isinstance(m, classes) else None
        if w is not None and w.dim() == 2:
            if not hasattr(m, "in_features"):
                m.in_features = w.shape[1]
            if not hasattr(m, "out_features"):
                m.out_features = w.shape[0]


# ----------------------------------------------------------------------------- the model
class PluggedModel(nn.Module):
    """A user's model behind the interface our trainer, tasks and diagnosis use."""

    # whole-model probes that rely on our block structure (bitnet.diagnose.probes.run_probes skips these)
    probes_not_applicable = {"residual_paths": NOT_APPLICABLE, "init_output_scale": NOT_APPLICABLE}
    generate = BitNetForCausalLM.generate  # the same loop, over the user's forward

    def __init__(self, net: nn.Module, config, linear_cls=(), twin_kind: str | None = None):
        super().__init__()
        self.net = net
        self.config = config
        self.linear_cls = linear_cls  # the user's quantized class(es), for bitnet.diagnose.probes.quantized_layers
        self.twin_kind = twin_kind
        give_shapes(net, linear_cls)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """(logits, loss); `labels` are already the next tokens, -100 where no loss is taken."""
        logits = logits_of_output(self.net(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return logits, loss

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for m in self.modules():
                if isinstance(m, nn.Embedding):
                    params.pop(id(m.weight), None)
        return sum(p.numel() for p in params.values())


def check_output(model: PluggedModel, spec: str, what: str = "your model"):
    """One forward on a tiny batch: the logits must be [B, T, vocab_size]."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, min(4, cfg.max_position_embeddings)), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    try:  # eval mode and a forked RNG: the check must not change what training draws (dropout, ...)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            logits = model.eval()(ids)[0]
    except Exception as e:  # noqa: BLE001
        raise PluggedError(f"--model {shown(spec)}: {what} failed on input_ids of shape {list(ids.shape)} ({first_line(e)}); "
                           f"its forward must take a [batch, seq] LongTensor") from None
    finally:
        model.train(was_training)
    want = (*ids.shape, cfg.vocab_size)
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    if shape != want:
        raise PluggedError(f"--model {shown(spec)}: {what} returned {shape} for input_ids {list(ids.shape)}, expected logits "
                           f"{list(want)} (vocab_size={cfg.vocab_size}); return [batch, seq, vocab] logits, or an "
                           f"object with .logits")


def call_factory(factory, cfg, **kwargs) -> nn.Module:
    try:
        net = factory(cfg, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise PluggedError(f"--model {shown(cfg.model_spec)}: the factory raised {first_line(e)}; fix it so that "
                           f"{getattr(factory, '__name__', 'f')}(cfg) returns an nn.Module (cfg is our "
                           f"{type(cfg).__name__}: vocab_size, hidden_size, num_hidden_layers, ...)") from None
    if not isinstance(net, nn.Module):
        raise PluggedError(f"--model {shown(cfg.model_spec)}: the factory returned a {type(net).__name__}, not a "
                           f"torch.nn.Module; return the model")
    return net


def swapped_for_linear(net: nn.Module, classes: tuple[type, ...]) -> int:
    """Replace every module of `classes` by an nn.Linear of the same shape and initial weight; the count."""
    swaps = [(parent, name, child) for parent in net.modules() for name, child in parent.named_children()
             if isinstance(child, classes)]
    for parent, name, child in swaps:
        w, b = child._parameters.get("weight"), child._parameters.get("bias")
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            linear.weight.copy_(w)
            if b is not None:
                linear.bias.copy_(b)
        setattr(parent, name, linear)
    return len(swaps)


def build_user_model(cfg) -> nn.Module:
    """The model for a run with --linear and/or --model (quant "ternary", or "none" for the twin)."""
    layer_cls = resolve(cfg, "layer") if cfg.linear_spec else None
    if not cfg.model_spec:  # --linear alone: our model with the user's layer; the twin is our model as it is
        if cfg.quant == "none":
            model = BitNetForCausalLM(cfg)
            model.twin_kind = OUR_TWIN
            return model
        return our_model_with(cfg, layer_cls)

    factory = resolve(cfg, "model")
    takes_linear = takes_keyword(factory, "linear_cls")
    if layer_cls is not None and not takes_linear:
        raise PluggedError(f"--linear with --model {shown(cfg.model_spec)}: the factory takes no linear_cls, so the layer "
                           f"cannot be put in; give it a keyword linear_cls (f(cfg, linear_cls=...)), or drop --linear")
    with_layer = {"linear_cls": linear_builder(layer_cls, cfg.linear_spec)} if layer_cls and takes_linear else {}
    if cfg.quant == "ternary":
        net = call_factory(factory, cfg, **with_layer)
        model = PluggedModel(net, cfg, quantized_classes(net, layer_cls))
        check_output(model, cfg.model_spec)
        return model

    # the twin: the user's model with nn.Linear where we can make it so
    name = getattr(factory, "__name__", "factory")
    if takes_linear:
        net = call_factory(factory, cfg, linear_cls=full_precision_linear)
        return checked_twin(net, cfg, f"your model with nn.Linear ({name}(cfg, linear_cls=nn.Linear))")
    with torch.random.fork_rng(devices=[]):  # the ternary build only tells which classes quantize
        classes = quantized_classes(call_factory(factory, replace(cfg, quant="ternary")), layer_cls)
    net = call_factory(factory, cfg)  # the same draws as the ternary run's build: the same initial weights
    left = [m for m in net.modules() if classes and isinstance(m, classes)]
    if classes and not left:
        return checked_twin(net, cfg, f"your model as {name}(cfg) builds it for quant='none'")
    why = "no quantized layer class found in it"
    if classes:
        n = swapped_for_linear(net, classes)
        kind = f"your model with its {n} {'/'.join(c.__name__ for c in classes)} layers swapped for nn.Linear"
        try:
            return checked_twin(net, cfg, kind)
        except PluggedError as e:
            why = f"with nn.Linear swapped in it no longer runs: {str(e).split(': ', 1)[-1]}"
    model = BitNetForCausalLM(cfg)  # the last resort: a twin, but of another model; the output says so
    model.twin_kind = f"our own fp model, not yours ({why})"
    return model


def checked_twin(net: nn.Module, cfg, kind: str) -> PluggedModel:
    model = PluggedModel(net, cfg, (), twin_kind=kind)
    check_output(model, cfg.model_spec, "the nn.Linear twin")
    return model


def twin_kind(model: nn.Module) -> str:
    return getattr(model, "twin_kind", None) or OUR_TWIN


# ----------------------------------------------------------------------------- the optimizer
def make_user_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The --optimizer factory's optimizer for the user's module. Each group remembers its initial lr
    and weight decay: the trainer's schedule scales each group's lr by the schedule's lr / peak lr,
    and switches weight decay off where ours does (two_stage's second stage)."""
    factory = resolve(cfg, "optimizer")
    target = model.net if isinstance(model, PluggedModel) else model
    try:
        opt = factory(target, cfg)
    except Exception as e:  # noqa: BLE001
        raise PluggedError(f"--optimizer {shown(cfg.optimizer_spec)}: the factory raised {first_line(e)}; fix it so that "
                           f"{getattr(factory, '__name__', 'f')}(model, cfg) returns a torch.optim.Optimizer") from None
    if not isinstance(opt, torch.optim.Optimizer):
        raise PluggedError(f"--optimizer {shown(cfg.optimizer_spec)}: the factory returned a {type(opt).__name__}, not a "
                           f"torch.optim.Optimizer; return the optimizer")
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group.setdefault("initial_weight_decay", group.get("weight_decay", 0.0))
    return opt


# ----------------------------------------------------------------------------- the verdict on the user's stack
def stack_statement(stack: dict, verdict: dict, history: list[dict], twin_history: list[dict] | None) -> str:
    """What the run says about the user's parts, in one line: which parts are theirs, and what the
    ternary-versus-twin comparison says about their layer."""
    plugged = stack.get("parts") or {}
    head = "your stack: " + ("; ".join(f"{part} {shown(spec)}" for part, spec in plugged.items()) or "ours only") + ". "
    subject = ("your layer" if ("layer" in plugged or "model" in plugged)
               else "with your optimizer, the ternary model" if "optimizer" in plugged else "the ternary model")
    ev = verdict["evidence"]
    consequences = list(ev.get("consequences", {}))  # probes that fail only through the trained weights
    failed = [name for name, ok in ev.get("probes", {}).items() if not ok and name not in consequences]
    twin = stack.get("twin")
    faults = verdict.get("faults") or []
    if faults:  # the verdict named the cause: say whose part it is, first
        causes = "; ".join(f"{'your' if f['part'] in plugged else 'the'} {f['part']}: {f['problem']}" for f in faults)
        line = head + f"the fault is {causes}"
        own = {f["check"] for f in faults}
        downstream = [name for name in failed + consequences if name not in own]
        if downstream and all(f["part"] != "layer" for f in faults):
            line += (f"; the layer probe(s) {', '.join(downstream)} fail as a consequence of it, "
                     f"not of {'your' if 'layer' in plugged or 'model' in plugged else 'the'} layer")
        return line
    if failed:
        return head + f"{subject} fails the probe(s) {', '.join(failed)}" + (
            f" ({', '.join(verdict['suspected_bugs'])})" if verdict.get("suspected_bugs") else "")
    t_learns, f_learns = ev.get("ternary_learns"), ev.get("twin_learns")
    if f_learns is None:
        return head + f"{subject} {'learns' if t_learns else 'does not learn'}; add --twin to compare it with nn.Linear"
    ours = twin is not None and twin.startswith("our own fp model")
    if t_learns:
        gap = history[-1]["val_loss"] - twin_history[-1]["val_loss"]
        how = (f"within {gap:.3f} nats of its fp twin" if gap > 0 else f"{-gap:.3f} nats below its fp twin")
        return head + f"{subject} trains {how} ({twin})"
    if f_learns:
        return head + (f"{subject} does not learn while the same model with nn.Linear does ({twin})" if not ours else
                       f"{subject} does not learn while {twin} does")
    return head + (f"neither {subject.removeprefix('with your optimizer, ')} nor its fp twin ({twin}) learns: "
                   f"the fault is outside the quantized layer (model, optimizer, data or hyper-parameters)")
