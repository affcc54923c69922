"""check_layer: our BitLinear, every injected layer bug, transformers' AutoBitLinear, plain
nn.Linear, and third-party-style layers (tests/fixtures/third_party_layers.py) written the ways
published BitNet code is written; exit codes, one-line errors, and SPEC loading."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from bitnet import check_layer
from bitnet.bitlinear import BitLinear
from bitnet.bugs import BUGS
from bitnet.diagnose.layer_probes import LAYER_CHECKS, layer_problems, probe_layer

ORIGINAL_OPS = (torch.nn.functional.linear, torch.matmul, torch.Tensor.__matmul__)
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "third_party_layers.py")


@pytest.fixture(autouse=True)
def own_sys_path(monkeypatch):
    """check_layer puts each --path first on sys.path, as a CLI should; inside the test process that
    must not outlive the test (a spawned process in a later test would import a stub `bitnet`)."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def run(capsys, *argv) -> tuple[int, dict, str]:
    """(exit code, the last-line JSON or {}, all stdout)."""
    t0 = time.process_time()  # CPU time: what the layer costs, whatever else shares the machine
    code = check_layer.main(list(argv))
    assert time.process_time() - t0 < 30, "a layer must be judged in under 30 CPU seconds"
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}), out


def test_our_bitlinear_is_ok(capsys):
    code, verdict, out = run(capsys, "bitnet.bitlinear:BitLinear")
    assert (code, verdict) == (0, {"verdict": "OK", "problems": [], "deviations": [], "layer": "bitnet.bitlinear:BitLinear"})
    for check in ("weights_ternary", "activations_int8", "per_token_scale", "output_matches_recipe", "ste_gradients",
                  "bias_used", "no_state_built_in_forward"):
        assert f"\n{check} " in out


@pytest.mark.parametrize("bug", [b for b in BUGS.values() if b.replaces is BitLinear], ids=lambda b: b.name)
def test_every_injected_layer_bug_is_named(capsys, bug):
    code, verdict, _ = run(capsys, f"bitnet.diagnose.bugs:{bug.cls.__name__}")
    assert code == 1 and verdict["verdict"] == "BROKEN" and verdict["problems"] == [bug.problem]


def test_plain_linear_is_broken(capsys):
    code, verdict, _ = run(capsys, "torch.nn:Linear")
    assert code == 1 and verdict["problems"] == ["weights_not_quantized", "act_not_rounded"]


def test_transformers_autobitlinear_is_ok(capsys, no_compile):
    pytest.importorskip("transformers.integrations.bitnet")
    code, verdict, _ = run(capsys, "transformers.integrations.bitnet:AutoBitLinear",
                           "--kwargs", '{"online_quant": true, "bias": false}')
    assert (code, verdict["problems"]) == (0, [])
    # with its own registered RMSNorm in front of the quantizer it is still the recipe
    code, verdict, _ = run(capsys, "transformers.integrations.bitnet:AutoBitLinear",
                           "--kwargs", '{"online_quant": true, "bias": false, "use_rms_norm": true}')
    assert (code, verdict["problems"]) == (0, [])


# every fixture: (the exact set of problems, the exact set of deviations)
THIRD_PARTY = {
    "FunctionSTELinear": ({}, {}),
    "NormedBitLinear": ({}, {}),
    "PrintingBitLinear": ({}, {}),
    "PositionalBiasLinear": ({}, {"scales_after_matmul"}),
    "UnusedBiasLinear": ({"bias_unused"}, {}),
    "ForwardNormLinear": ({"wrong_norm_scale", "norm_in_forward"}, {}),
    "ScaledNotRoundedLinear": ({"act_not_rounded"}, {}),
    "TensorScaleLinear": ({"per_tensor_act_scale"}, {}),
    "SignWeightLinear": ({"binary_not_ternary"}, {}),
    "InverseScaleLinear": ({"wrong_weight_scale"}, {}),
    "SignActivationLinear": ({"binary_activations"}, {}),
    "FrozenWeightLinear": ({"weights_not_trainable"}, {}),
    "IntegerNoRescaleLinear": ({"missing_rescale"}, {}),
    "RoundWithoutSTELinear": ({"no_ste"}, {}),
    "SignNormInForwardLinear": ({"binary_not_ternary", "wrong_norm_scale", "bias_unused", "norm_in_forward"}, {}),
    "SubLNBitLinear": ({}, {}),
    "TorchRMSNormBitLinear": ({}, {}),
    "FlaStyleBitLinear": ({}, {}),
    "FusedFlaStyleBitLinear": ({}, {}),
    "Grid128Linear": ({}, {"act_grid_128"}),
    "PerRowScaleLinear": ({}, {"per_row_weight_scale"}),
    "GradScaledSTELinear": ({}, {"grad_scaled_per_tensor"}),
    "SignNoRescaleLinear": ({"binary_not_ternary", "binary_activations", "missing_rescale"}, {}),
    "OutputQuantNoRescaleLinear": ({"quantizes_output", "per_tensor_act_scale", "missing_rescale"}, {}),
    "QbLayerNormLinear": ({"act_not_rounded"}, {"scales_after_matmul"}),
    "MaxScaleWeightLinear": ({"wrong_weight_scale"}, {}),
    "QuantizerModuleLinear": ({}, {}),
    "ModuleQuantizersLinear": ({"missing_rescale"}, {}),
    "IntKernelConventionsLinear": ({}, {"act_grid_128", "per_row_weight_scale", "scales_after_matmul"}),
}


@pytest.mark.parametrize("shape", [[], ["--seed", "2", "--in-features", "64", "--out-features", "48"]],
                         ids=["128x96", "64x48-seed2"])
@pytest.mark.parametrize("name", THIRD_PARTY)
def test_third_party_style_layers_are_judged_right(capsys, name, shape):
    """Every fault named, none that is not there; a harmless convention listed as a deviation
    (with its measure) and never making BROKEN; the same on another shape and draw."""
    code, verdict, out = run(capsys, f"{FIXTURES}:{name}", *shape)
    problems, deviations = THIRD_PARTY[name]
    assert set(verdict["problems"]) == set(problems) and len(verdict["problems"]) == len(problems)
    assert {d["problem"] for d in verdict["deviations"]} == set(deviations)
    assert all(d["measured"] for d in verdict["deviations"])
    assert code == (1 if problems else 0) and verdict["verdict"] == ("BROKEN" if problems else "OK")
    for p in problems:  # each name in the table with its severity, next to the evidence that measured it
        assert re.search(rf"FAIL .*{p} \((fatal|harmful)\)", out)
    for d in deviations:  # a deviation in the table too
        assert f"~{d} (deviation)" in out


def test_every_check_keeps_the_result_shape_and_says_how_bad():
    """The verdict reads name/passed/evidence/suspected_bug; a check that names several problems
    also lists them all, worst first, with the worst one's severity."""
    checks = probe_layer(load_fixture("SignNoRescaleLinear")(128, 96).double())
    assert [c["name"] for c in checks] == list(LAYER_CHECKS)
    assert all({"name", "passed", "evidence", "suspected_bug"} <= set(c) for c in checks)
    output = checks[LAYER_CHECKS.index("output_matches_recipe")]
    assert output["problems"][0] == output["suspected_bug"] == "missing_rescale" and output["severity"] == "fatal"
    assert set(output["problems"]) == {"missing_rescale", "binary_activations", "binary_not_ternary"}
    assert "weight scale 1/mean|W|" in output["evidence"]["why"]  # the measurement behind the name


def trained_looking(layer, seed=3):
    """A layer as training leaves it: its latent weight and every norm's gain and bias moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
            elif name.endswith("weight"):  # a norm's gain, far from 1 and uneven
                p.copy_(0.3 + 2 * torch.rand(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def load_fixture(name):
    from bitnet.spec import resolve_spec
    return resolve_spec(f"{FIXTURES}:{name}")


@pytest.mark.parametrize("name,kwargs", [("TorchRMSNormBitLinear", {}), ("NormedBitLinear", {}),
                                         ("FlaStyleBitLinear", {"norm_bias": True}),
                                         ("FusedFlaStyleBitLinear", {"norm_bias": True}), ("SubLNBitLinear", {}),
                                         ("SubLNBitLinear", {"bias": False})])
def test_a_trained_norm_inside_the_layer_is_part_of_the_reference(name, kwargs):
    """The reference is the layer as it is: a norm whose gain (and bias) trained away from 1 (0)
    is what the matmul should receive; a correct layer stays OK."""
    layer = trained_looking(load_fixture(name)(128, 96, **kwargs).double())
    norm = next(m for m in layer.modules() if m is not layer)
    assert float((norm.weight.detach() - 1).abs().max()) > 0.5  # the gain really moved
    t0 = time.perf_counter()
    checks = probe_layer(layer)
    assert time.perf_counter() - t0 < 5  # well under a second alone; the machine is shared
    assert layer_problems(checks) == [] and all(c["passed"] for c in checks), \
        [(c["name"], c["evidence"]) for c in checks if not c["passed"]]
    assert checks[3]["evidence"]["input"].startswith("module ")  # fitted through the layer's own norm


def test_transformers_autobitlinear_with_a_trained_rms_norm_is_ok(no_compile):
    bitnet_integration = pytest.importorskip("transformers.integrations.bitnet")
    layer = trained_looking(bitnet_integration.AutoBitLinear(128, 96, online_quant=True, bias=False,
                                                             use_rms_norm=True).double())
    checks = probe_layer(layer)
    assert layer_problems(checks) == [] and checks[3]["evidence"]["input"] == "module rms_norm"


def test_the_unit_gain_reference_is_not_what_passes_a_trained_norm():
    """The probe is not blind: the same layer with the norm's gain applied twice is no longer the
    recipe through its own norm, and says so."""
    cls = load_fixture("TorchRMSNormBitLinear")

    class GainTwice(cls):
        def forward(self, x):
            return super().forward(x * self.norm.weight)

    checks = probe_layer(trained_looking(GainTwice(128, 96).double()))
    assert not checks[3]["passed"]
def test_a_printing_layer_keeps_the_json_last_in_a_real_process(repo_root):
    proc = subprocess.run([sys.executable, "-m", "bitnet.check_layer", f"{FIXTURES}:PrintingBitLinear"],
                          capture_output=True, text=True, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["verdict"] == "OK"
    assert ") built" not in proc.stdout and "input (" not in proc.stdout  # the layer's own prints were kept out
    assert "the layer printed " in proc.stdout  # but counted


@pytest.mark.parametrize("argv,message", [
    (["no_colon_here"], "must be 'package.module:Name'"),
    (["not_a_module_xyz:Layer"], "cannot import 'not_a_module_xyz'"),
    (["bitnet.bitlinear:NoSuchLayer"], "has no 'NoSuchLayer'"),
    (["bitnet.bitlinear:BitLinear", "--kwargs", "{bad"], "--kwargs is not valid JSON"),
    (["bitnet.bitlinear:BitLinear", "--kwargs", '{"colour": 1}'], "cannot build BitLinear"),
    (["torch.nn:Identity"], "weight tensor"),
    (["torch.nn:Embedding"], "cannot call Embedding"),
])
def test_what_cannot_be_imported_or_built_is_exit_2_in_one_line(capsys, argv, message):
    assert check_layer.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_layer_whose_forward_fails_is_exit_2(tmp_path, capsys):
    (tmp_path / "broken.py").write_text(
        "import torch\nclass Crashes(torch.nn.Linear):\n"
        "    def forward(self, x):\n        raise RuntimeError('shapes do not match')\n")
    assert check_layer.main([f"{tmp_path / 'broken.py'}:Crashes"]) == 2
    err = capsys.readouterr().err
    assert "cannot call Crashes" in err and "shapes do not match" in err and err.count("\n") == 1


def test_a_user_package_called_bitnet_loads_beside_ours(tmp_path, capsys):
    pkg = tmp_path / "bitnet"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("WHOSE = 'theirs'\n")
    (pkg / "layers.py").write_text(
        "import torch.nn as nn\nimport torch.nn.functional as F\nfrom bitnet import WHOSE\n"
        "class TheirLinear(nn.Linear):\n    pass\n")
    code, verdict, _ = run(capsys, "bitnet.layers:TheirLinear", "--path", str(tmp_path))
    assert code == 1 and verdict["problems"] == ["weights_not_quantized", "act_not_rounded"]
    import bitnet
    assert not hasattr(bitnet, "WHOSE") and sys.modules["bitnet.bitlinear"].BitLinear is BitLinear
    assert sys.modules["_bitnet_user"].WHOSE == "theirs"
    assert (torch.nn.functional.linear, torch.matmul, torch.Tensor.__matmul__) == ORIGINAL_OPS  # hooks are gone


QUANT = ("import torch\n\n"
         "def activation_quant(x):\n    s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)\n"
         "    return (x * s).round().clamp(-128, 127) / s\n\n"
         "def weight_quant(w):\n    s = 1.0 / w.abs().mean().clamp(min=1e-5)\n    return (w * s).round().clamp(-1, 1) / s\n")
LINEAR = ("import torch.nn as nn\nimport torch.nn.functional as F\n"
          "from {top}.quant import weight_quant\nfrom .quant import activation_quant\n\n"
          "class BitLinear(nn.Linear):\n    def __init__(self, in_features, out_features):\n"
          "        super().__init__(in_features, out_features, bias=False)\n\n    def forward(self, x):\n"
          "        x_q = x + (activation_quant(x) - x).detach()\n"
          "        return F.linear(x_q, self.weight + (weight_quant(self.weight) - self.weight).detach())\n")


@pytest.mark.parametrize("top", ["bitnet", "their_bitnet_pkg"])
def test_a_file_inside_a_package_loads_as_that_packages_module(tmp_path, capsys, top):
    """their_repo/src/bitnet/linear.py importing its siblings as `bitnet.quant` and `.quant`: the
    file form of the SPEC, the seed user's own layout, with their package called bitnet or not."""
    pkg = tmp_path / "their_repo" / "src" / top
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "quant.py").write_text(QUANT)
    (pkg / "linear.py").write_text(LINEAR.format(top=top))
    src = tmp_path / "their_repo" / "src"
    for argv in ([f"{pkg / 'linear.py'}:BitLinear", "--path", str(src)], [f"{pkg / 'linear.py'}:BitLinear"]):
        code, verdict, _ = run(capsys, *argv)
        assert (code, verdict["verdict"], verdict["problems"]) == (0, "OK", []), capsys.readouterr().err
    import bitnet
    assert sys.modules["bitnet.bitlinear"].BitLinear is BitLinear and not hasattr(bitnet, "linear")


def test_every_layer_of_a_trained_model_with_its_own_norm_is_ok(tmp_path, capsys, repo_root, monkeypatch):
    """Our arithmetic model built with a BitLinear that holds a registered nn.RMSNorm, trained for
    real steps so that the gains move away from 1: every layer is judged OK afterwards."""
    import runpy

    from bitnet.diagnose.probes import float64_copy, quantized_layers
    from bitnet.checkpoint import load_checkpoint, model_from_checkpoint
    small = ["--preset", "arithmetic", "--set", "hidden_size=32", "--set", "intermediate_size=64",
             "--set", "num_hidden_layers=1", "--set", "num_attention_heads=4", "--set", "num_key_value_heads=4",
             "--set", "compile=false", "--set", "dtype=fp32", "--quiet", "--set", "batch_size=32",
             "--set", "max_position_embeddings=16", "--set", "warmup_steps=5", "--set", "eval_interval=40",
             "--set", "eval_problems=20", "--set", "learning_rate=1e-2", "--no-verdict"]
    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(sys, "argv", ["train_bitnet_arithmetic.py", "--out-dir", str(tmp_path), "--max-steps", "40",
                                      "--linear", f"{FIXTURES}:TorchRMSNormBitLinear", *small])
    try:
        runpy.run_path("train_bitnet_arithmetic.py", run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    model = model_from_checkpoint(load_checkpoint(str(tmp_path)))
    layers = quantized_layers(model)
    assert len(layers) == 7
    moved = max(float((layer.norm.weight.detach() - 1).abs().max()) for _, layer in layers)
    assert moved > 0.1, moved  # the gains trained away from 1
    for name, layer in layers:
        checks = probe_layer(float64_copy(layer))
        assert layer_problems(checks) == [] and all(c["passed"] for c in checks), \
            (name, [(c["name"], c["evidence"]) for c in checks if not c["passed"]])
