"""Issue 27, fail fast: a fault the checks before training find stops the run before its first step
(exit 1, verdict.json written); decisive evidence while training (weights collapsed > 100x) stops it
early and the verdict names the fault; a correct run is never stopped; --train-anyway trains."""
import json
import os
import subprocess
import sys


from bitnet.diagnose.early import TWIN_BEHIND_SHARE, twin_behind

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARITH = ["--set", "hidden_size=64", "--set", "intermediate_size=128", "--set", "num_hidden_layers=1",
              "--set", "num_attention_heads=4", "--set", "num_key_value_heads=4", "--set", "batch_size=32",
              "--set", "operators=*", "--set", "operator_weights=", "--set", "mul_max=5", "--set", "compile=false",
              "--set", "warmup_steps=10", "--set", "eval_problems=30", "--quiet"]


def train_arith(out, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train_bitnet_arithmetic.py", "--out-dir", str(out), *TINY_ARITH, *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def test_layer_bug_stops_before_the_first_step_with_exit_1(tmp_path):
    out = tmp_path / "no_ste"
    proc = train_arith(out, "--twin", "--max-steps", "40", "--inject-bug", "no_ste")
    assert proc.returncode == 1, proc.stderr[-2000:]
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"] == "BROKEN" and verdict["suspected_bugs"] == ["no_ste"]
    assert "before training" in verdict["evidence"]["checked"]
    # no child was started, no step taken: nothing trained, nothing saved
    assert not (out / "ternary").exists() and not list(out.rglob("ckpt.pt"))
    assert "INFRASTRUCTURE BROKEN" in proc.stdout and "BROKEN before training: no_ste" in proc.stderr


def test_train_anyway_trains_and_still_ends_broken(tmp_path):
    out = tmp_path / "anyway"
    proc = train_arith(out, "--max-steps", "20", "--set", "eval_interval=20", "--inject-bug", "residual_bug",
                       "--train-anyway")
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["stopped_early"] is None
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"] == "BROKEN" and "residual_bug" in verdict["suspected_bugs"]
    assert "checked" not in verdict["evidence"]  # the end-of-run verdict, on what was trained


def test_correct_twin_run_is_not_stopped_early(tmp_path):
    out = tmp_path / "correct"
    proc = train_arith(out, "--twin", "--max-steps", "80", "--set", "eval_interval=40", "--set", "learning_rate=5e-3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "before training: " in proc.stdout and "checks pass" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] == {"ternary": None, "fp": None}
    assert summary["ternary"]["steps"] == summary["fp"]["steps"] == 80
    assert summary["verdict"] != "BROKEN"


def test_collapsing_weights_stop_the_run_early_and_name_the_optimizer(tmp_path):
    """Adam's L2 decay (coupled) at a high rate drives the weights' RMS down > 100x in ~200 of this
    tiny model's 400 steps (as the rate anneals, the weights' jitter of ~lr shrinks); the watch
    stops there, before max_steps and without an evaluation due."""
    out = tmp_path / "coupled"
    proc = train_arith(out, "--max-steps", "400", "--set", "eval_interval=400", "--set", "learning_rate=2e-2",
                       "--set", "weight_decay=1", "--inject-bug", "coupled_weight_decay")
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and "weight RMS fell" in summary["stopped_early"]
    assert summary["steps"] < 400
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"] == "BROKEN" and verdict["suspected_bugs"] == ["coupled_weight_decay"]
    assert (out / "ckpt.pt").exists()  # stopped cleanly: evaluated and saved at the step it stopped


def evals(*points):
    return [{"kind": "eval", "step": s, "val_loss": v, "acc": a} for s, v, a in points]


def test_twin_behind_needs_two_evaluations_past_warm_up_and_a_clear_gap():
    """As the verdict does, a run learns when its loss is clearly below ln V and its task metric
    (here "acc") reaches 10%; the ternary model is measured from the unigram loss."""
    unigram, rules = 2.3, {"metric": "acc", "min_metric": 0.1}
    flat = evals((0, 3.5, 0), (500, 2.3, 0), (1000, 2.3, 0))
    twin = evals((0, 3.5, 0), (500, 1.0, 0.5), (1000, 0.5, 0.9))
    assert "the twin learns" in twin_behind(flat, twin, 32, 100, unigram, **rules)
    # an S-shaped ternary curve that starts to fall at the second evaluation is not stopped
    s_shape = evals((0, 3.5, 0), (500, 2.3, 0), (1000, 2.3 - 2 * TWIN_BEHIND_SHARE * (unigram - 0.5), 0.02))
    assert twin_behind(s_shape, twin, 32, 100, unigram, **rules) is None
    assert twin_behind(flat[:2], twin[:2], 32, 100, unigram, **rules) is None  # one evaluation: never decisive
    assert twin_behind(flat, twin, 32, 600, unigram, **rules) is None  # the second one inside 2 x warm-up
    slow_twin = evals((0, 3.5, 0), (500, 2.3, 0.01), (1000, 2.2, 0.05))
    assert twin_behind(flat, slow_twin, 32, 100, unigram, **rules) is None  # the twin does not learn either
