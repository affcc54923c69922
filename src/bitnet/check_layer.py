"""Judge someone else's BitLinear alone: `python -m bitnet.check_layer SPEC [--kwargs JSON] [--path DIR]...`

SPEC is `package.module:Class` or `path/to/file.py:Class`; the layer is built as
`Class(in_features, out_features, **kwargs)` (with a positional `bias=True` when the constructor
demands one), its latent weight set to N(0, 0.05^2) and probed on the CPU by the same layer
probes the verdict runs on our own model (bitnet/diagnose/layer_probes.py): float64 when the
layer runs in it, else float32. Prints one row per check with its evidence; the last line is
JSON {"verdict": "OK"|"BROKEN", "problems": [...], "deviations": [{"problem", "measured"}], "layer": SPEC}.
Only fatal or harmful problems (diagnose/problems.py) make BROKEN; a deviation (a harmless
convention) is listed with its measured size and leaves the layer OK.
Exit 0 OK, 1 BROKEN, 2 when the layer cannot be imported, built or called (one-line error).
"""
import argparse
import inspect
import json
import sys
import time

import torch

from .diagnose.layer_probes import latent_weight, layer_deviations, layer_problems, probe_layer
from .diagnose.problems import severity_of
from .diagnose.watch import captured_stdout
from .spec import SpecError, resolve_spec
from .errors import run_main


class LayerError(ValueError):
    """The layer cannot be built or called: exit 2."""


def build_layer(cls, in_features: int, out_features: int, kwargs: dict):
    """Class(in, out, **kwargs); constructors that require a `bias` positionally get True."""
    printed = []
    try:
        with captured_stdout(printed):
            return cls(in_features, out_features, **kwargs)
    except TypeError as first:
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            params = {}
        bias = params.get("bias")
        if bias is None or bias.default is not inspect.Parameter.empty or "bias" in kwargs:
            raise LayerError(f"cannot build {cls.__name__}({in_features}, {out_features}, **{kwargs}): {first}") from None
        try:
            with captured_stdout(printed):
                return cls(in_features, out_features, True, **kwargs)
        except Exception as e:
            raise LayerError(f"cannot build {cls.__name__}({in_features}, {out_features}, True): "
                             f"{type(e).__name__}: {e}") from None
    except Exception as e:
        raise LayerError(f"cannot build {cls.__name__}({in_features}, {out_features}, **{kwargs}): "
                         f"{type(e).__name__}: {e}") from None


def prepared(layer, in_features: int, out_features: int, dtype: torch.dtype, seed: int):
    """The layer on the CPU in `dtype`, its latent weight drawn from N(0, 0.05^2)."""
    layer = layer.to(device="cpu", dtype=dtype)
    found = latent_weight(layer, in_features, out_features)
    if found is None:
        raise LayerError(f"{type(layer).__name__} has no ({out_features}, {in_features}) or "
                         f"({in_features}, {out_features}) weight tensor")
    _, weight, _ = found
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.05)
    return layer


def check_layer(cls, in_features: int = 128, out_features: int = 96, kwargs: dict | None = None,
                seed: int = 0) -> tuple[list[dict], str]:
    """(checks, dtype used). Tries float64, then float32; LayerError when neither runs."""
    errors = []
    for dtype in (torch.float64, torch.float32):
        layer = prepared(build_layer(cls, in_features, out_features, kwargs or {}), in_features, out_features,
                         dtype, seed)
        try:
            return probe_layer(layer, in_features, out_features, seed=seed), str(dtype).removeprefix("torch.")
        except Exception as e:  # the user's forward/backward failed: try the next dtype, then give up
            errors.append(f"{str(dtype).removeprefix('torch.')}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise LayerError(f"cannot call {cls.__name__} on a (2, 8, {in_features}) input: " + "; ".join(errors))


def format_table(checks: list[dict]) -> str:
    """One row per check: result, the problems it names with their severity (deviations after
    a '~'), and its evidence."""
    lines = [f"{'check':<26} {'result':<6} {'problems (severity)':<40} evidence"]
    for c in checks:
        names = [f"{p} ({severity_of(p)})" for p in (c.get("problems") or [c["suspected_bug"]] if not c["passed"] else [])
                 if p]
        names += [f"~{d['problem']} (deviation)" for d in c["evidence"].get("deviations") or ()]
        ev = json.dumps({k: v for k, v in c["evidence"].items() if k != "deviations"},
                        default=lambda v: round(v, 6) if isinstance(v, float) else str(v))
        lines.append(f"{c['name']:<26} {'pass' if c['passed'] else 'FAIL':<6} {', '.join(names) or '-':<40} {ev[:300]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Probe one BitLinear-style layer against the BitNet b1.58 recipe.")
    p.add_argument("spec", metavar="SPEC", help="package.module:Class or path/to/file.py:Class")
    p.add_argument("--kwargs", default="{}", metavar="JSON", help="extra constructor keyword arguments, a JSON object")
    p.add_argument("--path", action="append", default=[], metavar="DIR",
                   help="put DIR first on sys.path (repeatable), e.g. a stub for a package that is not installed")
    p.add_argument("--in-features", type=int, default=128)
    p.add_argument("--out-features", type=int, default=96, help="keep it different from --in-features")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.compiler.set_stance("force_eager")  # published quantizers are often @torch.compile'd: run them eagerly
    t0 = time.perf_counter()
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise LayerError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
        cls = resolve_spec(args.spec, args.path)
        if not callable(cls):
            raise LayerError(f"{args.spec!r} is not a class or callable")
        checks, dtype = check_layer(cls, args.in_features, args.out_features, kwargs, args.seed)
    except json.JSONDecodeError as e:
        print(f"error: --kwargs is not valid JSON ({e})", file=sys.stderr)
        return 2
    except (SpecError, LayerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = layer_problems(checks)
    deviations = layer_deviations(checks)
    unnamed = [c["name"] for c in checks if not c["passed"] and not c["suspected_bug"]]
    verdict = "BROKEN" if problems or unnamed else "OK"
    print(f"layer {args.spec}: {args.in_features} -> {args.out_features}, {dtype}, "
          f"{time.perf_counter() - t0:.1f} s")
    print(format_table(checks))
    printed = sum(c["evidence"].get("printed_lines", 0) for c in checks)
    if printed:
        print(f"the layer printed {printed} line(s) while probed (not shown)")
    if unnamed:
        print("failed without a named problem: " + ", ".join(unnamed))
    if deviations:
        print("deviations from the recipe (harmless, not bugs): " + "; ".join(
            f"{d['problem']} {json.dumps(d['measured'])}" for d in deviations))
    print(json.dumps({"verdict": verdict, "problems": problems, "deviations": deviations, "layer": args.spec}))
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(run_main(main))  # a bug of ours exits 70 with its traceback, never 1 (BROKEN)
