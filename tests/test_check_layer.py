"""check_layer: our BitLinear, every injected layer bug, transformers' AutoBitLinear, plain
nn.Linear, and third-party-style layers (tests/fixtures/third_party_layers.py) written the ways
published BitNet code is written; exit codes, one-line errors, and SPEC loading."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bitnet import check_layer
from bitnet.bitlinear import BitLinear
from bitnet.bugs import BUGS

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
    assert (code, verdict) == (0, {"verdict": "OK", "problems": [], "layer": "bitnet.bitlinear:BitLinear"})
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


THIRD_PARTY = {
    "FunctionSTELinear": [],
    "NormedBitLinear": [],
    "PrintingBitLinear": [],
    "PositionalBiasLinear": [],
    "UnusedBiasLinear": ["bias_unused"],
    "ForwardNormLinear": ["wrong_norm_scale", "norm_in_forward"],
    "ScaledNotRoundedLinear": ["act_not_rounded"],
    "TensorScaleLinear": ["per_tensor_act_scale"],
    "SignWeightLinear": ["binary_not_ternary"],
    "InverseScaleLinear": ["wrong_weight_scale"],
    "SignActivationLinear": ["binary_activations"],
    "FrozenWeightLinear": ["weights_not_trainable"],
    "IntegerNoRescaleLinear": ["missing_rescale"],
    "RoundWithoutSTELinear": ["no_ste"],
    "SignNormInForwardLinear": ["binary_not_ternary", "wrong_norm_scale", "bias_unused", "norm_in_forward"],
    "SubLNBitLinear": [],
}


@pytest.mark.parametrize("name", THIRD_PARTY)
def test_third_party_style_layers_are_judged_right(capsys, name):
    code, verdict, _ = run(capsys, f"{FIXTURES}:{name}")
    want = THIRD_PARTY[name]
    assert verdict["problems"] == want and code == (1 if want else 0)


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
