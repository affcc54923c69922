"""Bring your own stack (--linear / --model / --optimizer / --path, bitnet.plugged): the experiments
end to end on examples/'s TinyTernaryLM, its checkpoints in the tools, the twin's routes, a user
package called `bitnet`, and the one-line errors. Tiny configs, few steps."""
import json
import os
import runpy
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from bitnet.config_tiny import BitNetConfigArithmetic
from bitnet.build import build_model, make_optimizer
from bitnet.checkpoint import load_checkpoint, model_from_checkpoint
from bitnet.errors import TrainingError
from bitnet.schedule import apply_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
FACTORIES = os.path.join(REPO, "tests", "fixtures", "byo_factories.py")
ARITH = os.path.join(REPO, "train_bitnet_arithmetic.py")
SMALL = ["--set", "hidden_size=32", "--set", "intermediate_size=64", "--set", "num_hidden_layers=1",
         "--set", "num_attention_heads=4", "--set", "num_key_value_heads=4", "--set", "compile=false",
         "--set", "dtype=fp32", "--quiet"]
SMALL_ARITH = ["--preset", "arithmetic", *SMALL, "--set", "batch_size=32", "--set", "operators=*",
               "--set", "operator_weights=", "--set", "mul_max=5", "--set", "max_position_embeddings=16",
               "--set", "warmup_steps=10", "--set", "eval_problems=20", "--set", "learning_rate=5e-3",
               "--set", "weight_decay=0"]
MODEL = ["--model", "examples/adapter.py:build"]


def run(args: list[str], launcher: str | None = None) -> subprocess.CompletedProcess:
    """`python ARGS`, or `bash LAUNCHER ARGS` (the launchers call `python`: this interpreter, first on PATH)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(REPO, "src"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    cmd = ["bash", launcher, *args] if launcher else [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def run_in_process(capsys, script: str, argv: list[str]) -> tuple[int, list[str]]:
    """A train script or a `bitnet.<tool>` main as its command line runs it: (exit code, stderr lines)."""
    from bitnet.errors import run_main
    capsys.readouterr()
    old_argv, old_path, old_cwd = sys.argv, list(sys.path), os.getcwd()
    sys.argv = [script, *argv]
    os.chdir(REPO)  # relative SPECs, as a user types them
    try:
        if script.endswith(".py"):
            runpy.run_path(script, run_name="__main__")
        else:
            run_main(__import__(f"bitnet.{script}", fromlist=["main"]).main)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = old_argv, old_path  # a --path must not leak into later tests
        os.chdir(old_cwd)
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.fixture
def own_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def user_pkg(tmp_path) -> str:
    """A folder holding a user's own package called `bitnet` (several BitNet stacks are): examples/
    made into one (bitnet/model.py, bitnet/adapter.py importing it relatively)."""
    pkg = tmp_path / "user_pkg" / "bitnet"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Their bitnet, not ours."""\n')
    shutil.copy(os.path.join(EXAMPLES, "tiny_ternary_lm.py"), pkg / "model.py")
    adapter = open(os.path.join(EXAMPLES, "adapter.py")).read()
    assert "from tiny_ternary_lm import" in adapter
    (pkg / "adapter.py").write_text(adapter.replace("from tiny_ternary_lm import", "from .model import"))
    return str(pkg.parent)


def cfg_with(**plugs):
    base = BitNetConfigArithmetic(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=4, max_position_embeddings=16, dtype="fp32")
    return replace(base, **plugs)


# ----------------------------------------------------------------------------- the arithmetic experiment

@pytest.fixture(scope="module")
def arith_twin(tmp_path_factory):
    """The arithmetic launcher's twin run on TinyTernaryLM with its AdamW factory, as a user runs it."""
    out = tmp_path_factory.mktemp("byo") / "twin"
    proc = run(["--out-dir", str(out), "--max-steps", "60", "--set", "eval_interval=30",
                *SMALL_ARITH, *MODEL, "--optimizer", "examples/adapter.py:optimizer"], launcher="start_arithmetic_experiment.sh")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_model_and_optimizer_twin_run_is_ok_and_says_which_twin(arith_twin):
    out, proc = arith_twin
    verdict = json.loads((out / "verdict.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert verdict["verdict"] == "OK", verdict["evidence"]["reason"]
    probes = verdict["evidence"]["probes"]
    assert all(probes.values())
    stack = verdict["your_stack"]
    assert set(stack["parts"]) == {"model", "optimizer"} and stack["parts"]["model"].endswith("examples/adapter.py:build")
    assert stack["twin"] == summary["twin"] == "your model with nn.Linear (build(cfg, linear_cls=nn.Linear))"
    assert "your layer trains" in stack["statement"] and "fp twin" in stack["statement"]
    assert "twin: your model with nn.Linear" in proc.stdout and stack["statement"] in proc.stdout
    ternary = model_from_checkpoint(load_checkpoint(str(out / "ternary")))
    twin = model_from_checkpoint(load_checkpoint(str(out / "fp")))
    assert type(ternary.net).__name__ == type(twin.net).__name__ == "TinyTernaryLM"  # the user's model, both sides
    assert [type(m).__name__ for m in ternary.modules()].count("TernaryLinear") == 4
    assert not [m for m in twin.modules() if type(m).__name__ == "TernaryLinear"]
    assert load_checkpoint(str(out / "ternary"))["optimizer_class"] == "AdamW"
    layer_probe = "weights_ternary"  # the layer probes ran on the user's 4 TernaryLinear layers
    assert "n/a" not in proc.stdout.split(layer_probe)[1].splitlines()[0]


def test_plugged_checkpoints_reload_in_generate_evaluate_and_diagnose(arith_twin, tmp_path, capsys):
    out, _ = arith_twin
    problems = tmp_path / "problems.txt"
    problems.write_text("".join(f"{a} * {b} = {a * b}\n" for a in range(6) for b in range(6)))
    code, err = run_in_process(capsys, "evaluate", ["--checkpoint", str(out), "--arithmetic", str(problems)])
    assert code == 0, err
    gen = run(["-m", "bitnet.generate", "--checkpoint", str(out), "--prompt", "3 * 4 ="])
    assert gen.returncode == 0, gen.stderr
    lines = gen.stdout.strip().splitlines()
    assert [ln.split("]")[0] for ln in lines] == ["[ternary", "[fp twin"] and all("3 * 4 =" in ln for ln in lines)
    from bitnet.diagnose import diagnose_checkpoint
    verdict = diagnose_checkpoint(str(out))
    assert verdict["verdict"] == "OK" and verdict["your_stack"]["twin"].startswith("your model with nn.Linear")


def test_linear_alone_runs_our_model_with_the_users_layer_and_resumes(tmp_path, capsys):
    out = tmp_path / "linear"
    flags = ["--linear", "examples/tiny_ternary_lm.py:TernaryLinear", "--set", "eval_interval=40"]
    code, err = run_in_process(capsys, ARITH, ["--out-dir", str(out), "--max-steps", "40", *SMALL_ARITH, *flags])
    assert code == 0, err
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"] == "OK", verdict["evidence"]["reason"]
    assert verdict["your_stack"]["parts"] == {"layer": os.path.join(EXAMPLES, "tiny_ternary_lm.py") + ":TernaryLinear"}
    assert "add --twin" in verdict["your_stack"]["statement"]
    ckpt = load_checkpoint(str(out))
    model = model_from_checkpoint(ckpt)
    assert type(model).__name__ == "BitNetForCausalLM" and model.linear_cls.__name__ == "TernaryLinear"
    assert any(k.endswith("q_proj.weight") for k in ckpt["model"])  # our model, the user's layer
    from bitnet.diagnose import run_layer_probes
    assert run_layer_probes(model)[0]["evidence"]["layers_checked"] == 7  # every projection is theirs
    from bitnet.export import export
    with pytest.raises(TrainingError, match="trained with your own linear"):  # it would run our BitLinear instead
        export(str(out), str(tmp_path / "export"))
    # --resume with other parts is refused in one line; without the flags it takes the checkpoint's
    code, err = run_in_process(capsys, ARITH, ["--out-dir", str(out), "--max-steps", "50", "--resume", *SMALL_ARITH,
                                               "--linear", "bitnet.bitlinear:BitLinear", "--set", "eval_interval=40",
                                               "--no-verdict"])
    assert code == 2 and len(err) == 1 and "pass the same --linear/--model/--optimizer/--path" in err[0], err
    code, err = run_in_process(capsys, ARITH, ["--out-dir", str(out), "--max-steps", "50", "--resume", *SMALL_ARITH,
                                               "--set", "eval_interval=40", "--no-verdict"])
    assert code == 0, err
    ckpt = load_checkpoint(str(out))
    assert ckpt["step"] == 50 and ckpt["config"]["linear_spec"].endswith("tiny_ternary_lm.py:TernaryLinear")


# ----------------------------------------------------------------------------- the TinyStories experiment

NAMES, THINGS = ["Lily", "Tom", "Ben", "Sue", "Max"], ["ball", "cat", "tree", "cake", "boat", "dog"]


def stories(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        name, thing, other = (NAMES[int(torch.randint(5, (1,), generator=g))],
                              *[THINGS[int(i)] for i in torch.randint(6, (2,), generator=g)])
        out.append(f"Once upon a time, {name} had a {thing}. {name} liked the {thing} and the {other}. "
                   f"One day {name} saw a big {other}. {name} was happy.\n<|endoftext|>\n")
    return "".join(out)


def test_tinystories_twin_run_with_all_three_parts(tmp_path, capsys):
    from bitnet.text_tokenizer import save_tokenizer, train_bpe
    from bitnet.data_tinystories import iter_stories
    (tmp_path / "train.txt").write_text(stories(300, 0))
    (tmp_path / "valid.txt").write_text(stories(40, 1))
    save_tokenizer(train_bpe(iter_stories(str(tmp_path / "train.txt")), 300, show_progress=False), str(tmp_path / "tok"))
    out = tmp_path / "ts"
    proc = run(["--out-dir", str(out), "--preset", "tiny-cpu", *SMALL, "--set", "vocab_size=300",
                "--set", "max_position_embeddings=32", "--set", "batch_size=8", "--set", "warmup_steps=5",
                "--set", "eval_tokens=512", "--set", "sample_tokens=6", "--set", "eval_interval=30",
                "--max-steps", "30", "--train-file", str(tmp_path / "train.txt"), "--val-file", str(tmp_path / "valid.txt"),
                "--tokenizer", str(tmp_path / "tok"), *MODEL, "--optimizer", "examples/adapter.py:optimizer",
                "--linear", "tiny_ternary_lm:TernaryLinear", "--path", "examples"], launcher="start_tinystories_experiment.sh")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenizer: using" in proc.stdout  # the launcher kept our tokenizer and passed every flag on
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"] != "BROKEN" and all(verdict["evidence"]["probes"].values()), verdict["evidence"]["reason"]
    assert set(verdict["your_stack"]["parts"]) == {"layer", "model", "optimizer"}
    assert verdict["your_stack"]["twin"].startswith("your model with nn.Linear")
    cfg = load_checkpoint(str(out / "ternary"))["config"]
    assert cfg["linear_spec"] == "tiny_ternary_lm:TernaryLinear" and cfg["spec_paths"] == EXAMPLES
    code, err = run_in_process(capsys, "evaluate", ["--checkpoint", str(out / "ternary"), "--text",
                                                    str(tmp_path / "valid.txt"), "--max-tokens", "200"])
    assert code == 0, err


# ----------------------------------------------------------------------------- the twin's routes

def test_twin_swaps_the_users_layer_for_nn_linear_when_the_factory_takes_none(own_sys_path):
    cfg = cfg_with(model_spec=f"{FACTORIES}:fixed", spec_paths=EXAMPLES)
    torch.manual_seed(0)
    ternary = build_model(cfg)
    torch.manual_seed(0)
    twin = build_model(replace(cfg, quant="none"))
    assert twin.twin_kind == "your model with its 4 TernaryLinear layers swapped for nn.Linear"
    assert not [m for m in twin.modules() if type(m).__name__ == "TernaryLinear"]
    same = {k: v for k, v in twin.state_dict().items()}
    for k, v in ternary.state_dict().items():  # the same shapes and the same initial weights
        assert torch.equal(same[k], v), k


def test_twin_is_the_factorys_own_fp_build_when_it_honours_quant(own_sys_path):
    twin = build_model(cfg_with(model_spec=f"{FACTORIES}:by_quant", spec_paths=EXAMPLES, quant="none"))
    assert twin.twin_kind == "your model as by_quant(cfg) builds it for quant='none'"
    assert sum(type(m) is nn.Linear for m in twin.modules()) == 4


def test_twin_falls_back_to_our_fp_model_and_says_so(own_sys_path):
    twin = build_model(cfg_with(model_spec=f"{FACTORIES}:picky", spec_paths=EXAMPLES, quant="none"))
    assert type(twin).__name__ == "BitNetForCausalLM"
    assert twin.twin_kind.startswith("our own fp model, not yours (with nn.Linear swapped in it no longer runs")
    from bitnet.diagnose.verdict import make_verdict
    from bitnet.plugged import stack_statement
    # decisive: the twin came 2.5 nats down from ln V, the ternary model 0.05
    v = make_verdict([], {"learns": False, "baseline_loss": 3.5, "final_val_loss": 3.45, "after_warmup": True},
                     {"learns": True, "baseline_loss": 3.5, "final_val_loss": 1.0, "after_warmup": True})
    assert v["verdict"] == "BROKEN"
    line = stack_statement({"parts": {"model": "m:f"}, "twin": twin.twin_kind}, v, [{"val_loss": 3.0}], [{"val_loss": 1.0}])
    assert "your layer does not learn while our own fp model, not yours" in line


def test_your_stack_line_names_the_faulty_part_before_the_probes_it_broke():
    """Coupled decay drives the weights below the quantizer's clamp, so the layer probes fail too:
    the line names the user's optimizer as the cause and the probes as its consequence."""
    from bitnet import diagnose
    from bitnet.diagnose import detectors as det
    from bitnet.plugged import stack_statement
    zeros = diagnose.result("weights_ternary", False, {"why": "(almost) every weight is zero"}, "wrong_weight_scale")
    collapse = det.detect_weight_collapse([{"step": 0, "val_loss": 3.5, "weight_rms": 0.02},
                                           {"step": 400, "val_loss": 3.4, "weight_rms": 4e-7}], 32)
    stalls = {"learns": False, "reason": "flat"}
    v = diagnose.make_verdict([zeros], stalls, stalls, [collapse])
    line = stack_statement({"parts": {"optimizer": "m:opt"}, "twin": "our own fp model"}, v, [], [])
    assert "the fault is your optimizer: coupled_weight_decay" in line
    assert "weights_ternary fail as a consequence of it, not of the layer" in line
    layer = diagnose.result("weights_ternary", False, {}, "missing_rescale")
    v = diagnose.make_verdict([layer], stalls, stalls, [])
    line = stack_statement({"parts": {"layer": "m:L"}, "twin": "x"}, v, [], [])
    assert line.endswith("the fault is your layer: missing_rescale")


def test_a_user_package_called_bitnet_loads_beside_ours(own_sys_path, user_pkg, tmp_path):
    import bitnet.model
    cfg = cfg_with(model_spec="bitnet.adapter:build", optimizer_spec="bitnet.adapter:optimizer",
                   linear_spec="bitnet.model:TernaryLinear", spec_paths=user_pkg)
    model = build_model(cfg)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    theirs = sys.modules["_bitnet_user.model"]  # their bitnet.model, kept under the alias
    assert type(model.net) is theirs.TinyTernaryLM and model.linear_cls == (theirs.TernaryLinear,)
    assert sys.modules["bitnet.model"] is bitnet.model and hasattr(bitnet.model, "BitNetForCausalLM")  # ours intact
    assert isinstance(opt, torch.optim.AdamW) and len([m for m in model.modules() if isinstance(m, model.linear_cls)]) == 4
    twin = build_model(replace(cfg, quant="none"))
    assert twin.twin_kind.startswith("your model with nn.Linear")
    from bitnet.diagnose import run_probes
    assert all(r["passed"] for r in run_probes(model))
    torch.save({"model": model.state_dict(), "config": cfg.__dict__, "config_class": "BitNetConfigArithmetic"},
               tmp_path / "ckpt.pt")
    again = model_from_checkpoint(load_checkpoint(str(tmp_path)))
    assert torch.equal(again.net.tok.weight, model.net.tok.weight)


def test_user_optimizer_groups_keep_their_ratio_under_the_schedule(own_sys_path):
    cfg = cfg_with(optimizer_spec=f"{FACTORIES}:sgd", spec_paths=EXAMPLES, learning_rate=0.01, weight_decay=0.1)
    model = build_model(cfg)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    apply_schedule(opt, cfg, 0.005, 0.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.0005])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    apply_schedule(opt, cfg, 0.01, 0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.001])


# ----------------------------------------------------------------------------- one-line errors

@pytest.mark.parametrize("flags, needle", [
    (["--model", "examples/adapter.py"], "must be 'package.module:Name' or 'path/to/file.py:Name'"),
    (["--model", "no_such_pkg.models:build"], "cannot import 'no_such_pkg.models'"),
    (["--model", "examples/adapter.py:nope"], "has no 'nope'"),
    (["--model", "tests/fixtures/byo_factories.py:raises", "--path", "examples"], "the factory raised RuntimeError: no GPU found"),
    (["--model", "tests/fixtures/byo_factories.py:wrong_shape", "--path", "examples"], "expected logits [2, 4, 32]"),
    (["--model", "tests/fixtures/byo_factories.py:not_a_module", "--path", "examples"], "not a torch.nn.Module"),
    (["--model", "tests/fixtures/byo_factories.py:fixed", "--path", "examples", "--linear",
      "examples/tiny_ternary_lm.py:TernaryLinear"], "the factory takes no linear_cls"),
    ([*MODEL, "--optimizer", "tests/fixtures/byo_factories.py:bad_optimizer", "--path", "examples"],
     "--optimizer tests/fixtures/byo_factories.py:bad_optimizer: the factory raised ValueError"),
    (["--linear", "torch.nn:Embedding", "--path", "nope_dir"], "is not a folder"),
    ([*MODEL, "--inject-bug", "no_ste"], "--inject-bug swaps a bug into our own model"),
])
def test_bad_plug_ins_are_one_line_errors(capsys, tmp_path, flags, needle):
    code, err = run_in_process(capsys, ARITH, ["--out-dir", str(tmp_path / "x"), "--max-steps", "2", *SMALL_ARITH, *flags])
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


@pytest.mark.parametrize("flags, needle", [
    (["--model", "tests/fixtures/byo_factories.py:raises", "--path", "examples"], "the factory raised RuntimeError"),
    ([*MODEL, "--optimizer", "tests/fixtures/byo_factories.py:bad_optimizer", "--path", "examples"], "--optimizer"),
])
def test_a_twin_run_checks_the_users_code_before_its_children_start(capsys, tmp_path, flags, needle):
    code, err = run_in_process(capsys, ARITH, ["--twin", "--out-dir", str(tmp_path / "x"), "--max-steps", "2",
                                               *SMALL_ARITH, *flags])
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "x" / "ternary").exists()


def test_checkpoint_whose_code_is_gone_is_a_one_line_error(tmp_path, own_sys_path):
    cfg = cfg_with(model_spec=str(tmp_path / "gone.py") + ":build")
    torch.save({"model": {}, "config": cfg.__dict__, "config_class": "BitNetConfigArithmetic"}, tmp_path / "ckpt.pt")
    with pytest.raises(TrainingError, match="the checkpoint's model did not rebuild: --model .*gone.py:build: no file"):
        model_from_checkpoint(load_checkpoint(str(tmp_path)))


# ----------------------------------------------------------------------------- part B's optimizer detector

def test_adam_with_l2_weight_decay_is_named_as_the_optimizer(tmp_path, capsys):
    """30 steps of a tiny model are too few for coupled decay to collapse the weights (at the CPU
    preset it does within 400 steps and reads BROKEN: RESULTS.md, issue 11), so the verdict stays
    with the evidence and names the optimizer as a warning."""
    out = tmp_path / "adam"
    code, err = run_in_process(capsys, ARITH, ["--out-dir", str(out), "--max-steps", "30", "--set", "eval_interval=30",
                                               *SMALL_ARITH, *MODEL, "--optimizer", "examples/adapter.py:adam_l2"])
    assert code == 0, err
    verdict = json.loads((out / "verdict.json").read_text())
    named = [w for w in verdict["evidence"]["warnings"] if w.startswith("optimizer: Adam with weight_decay=0.1")]
    assert named and "AdamW" in named[0], verdict["evidence"]["warnings"]