"""Diagnosis: each probe against each injected bug, the detectors on synthetic inputs, the
verdict logic, quantization-health numbers on a hand-made layer, the pictures and the CLI."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bitnet import diagnose
from bitnet.bitlinear import BitLinear
from bitnet.bitlinear import activation_quant, ste
from bitnet.config_tiny import BitNetConfig, BitNetConfigArithmetic
from bitnet.data_arithmetic import ArithmeticTask
from bitnet.train_signals import TrainingSignals
from bitnet.diagnose.report import diagnose_run
from bitnet.diagnose.rules import conclude, context_free_baseline
from bitnet.bugs import BUGS
from bitnet.model import BitNetForCausalLM
from bitnet.build import build_model
from bitnet.trainer import train

torch.set_num_threads(1)

# the shared data sits beside the checkout (../shared), however deep the checkout is
STORIES = next((p / "shared" / "data" / "tinystories" for p in Path(__file__).resolve().parents
                if (p / "shared" / "data" / "tinystories").is_dir()), Path("../shared/data/tinystories"))


def small_model(bug: str = "", quant: str = "ternary", seed: int = 0) -> BitNetForCausalLM:
    torch.manual_seed(seed)
    return build_model(BitNetConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4, inject_bug=bug,
                                          quant=quant))


def failing(probes: list[dict]) -> dict[str, str | None]:
    return {p["name"]: p["suspected_bug"] for p in probes if not p["passed"]}


# --- probes -----------------------------------------------------------------------------------

# Which probes each bug must trip; every one of them must name the bug's problem.
EXPECTED_FAILURES = {
    "no_ste": {"ste_gradients"},
    "no_rescale": {"output_matches_recipe", "init_output_scale"},
    "per_tensor_act": {"per_token_scale", "output_matches_recipe", "causal_attention"},  # the scale sees the future
    "quantize_output": {"activations_int8", "output_matches_recipe"},
    "binary_weights": {"weights_ternary", "output_matches_recipe"},
    "wrong_scale": {"weights_ternary", "output_matches_recipe", "init_output_scale"},
    "norm_in_forward": {"all_parameters_trained"},
    "residual_bug": {"residual_paths"},
}


def test_expected_failures_cover_every_bug():
    assert set(EXPECTED_FAILURES) == set(BUGS)


@pytest.mark.parametrize("seed", [0, 1])
def test_correct_model_passes_every_probe(seed):
    probes = diagnose.run_probes(small_model(seed=seed))
    assert [p["name"] for p in probes] == list(diagnose.PROBE_NAMES)
    assert failing(probes) == {}
    assert all(p["suspected_bug"] is None for p in probes)


@pytest.mark.parametrize("bug", BUGS)
def test_each_bug_fails_its_probes_and_is_named(bug):
    probes = diagnose.run_probes(small_model(bug))
    assert failing(probes) == {name: BUGS[bug].problem for name in EXPECTED_FAILURES[bug]}


def test_probes_pass_on_a_trained_model_and_leave_it_unchanged():
    model = small_model(seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(5):  # move the weights off their initial distribution
        x, y = diagnose.random_batch(model, 4, 16, seed=step)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert failing(diagnose.run_probes(model)) == {}
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_full_precision_model_has_no_quantized_layers_to_fail():
    probes = diagnose.run_probes(small_model(quant="none"))
    assert failing(probes) == {}
    assert probes[0]["evidence"]["layers_checked"] == 0


def test_effective_weight_is_the_ternary_matrix():
    layer = BitLinear(8, 3).double()
    assert torch.equal(diagnose.effective_weight(layer), diagnose.reference_weight_quant(layer.weight.detach()))


# --- detectors --------------------------------------------------------------------------------

def history(losses, start=0, every=100):
    return [{"step": start + i * every, "val_loss": v} for i, v in enumerate(losses)]


def test_not_learning_detector():
    ln32 = math.log(32)
    assert diagnose.detect_not_learning(history([ln32, 2.0, 1.2]), 32, warmup_steps=100)["passed"]
    flat = diagnose.detect_not_learning(history([ln32, ln32 - 0.1, ln32 - 0.2]), 32, warmup_steps=100)
    assert not flat["passed"] and flat["name"] == "not_learning"
    # a low loss before warm-up ends is not yet evidence of learning
    assert not diagnose.detect_not_learning(history([ln32, 1.0]), 32, warmup_steps=500)["passed"]
    assert not diagnose.detect_not_learning(history([ln32]), 32)["passed"]  # only the step-0 evaluation
    assert not diagnose.detect_not_learning(history([ln32, float("nan")]), 32)["passed"]
    assert not diagnose.detect_not_learning([], 32)["passed"]


def test_learning_summary_threshold_and_task_metric():
    s = diagnose.learning_summary(history([3.5, 2.9]), 32)
    assert s["threshold"] == pytest.approx(math.log(32) - max(0.3, 0.15 * math.log(32)))
    assert s["learns"]  # 2.9 < 2.946
    h = [{"step": 100, "val_loss": 1.0, "indist_acc": 0.01}]
    assert not diagnose.learning_summary(h, 32, metric="indist_acc", min_metric=0.05)["learns"]
    assert diagnose.learning_summary(h, 32, metric="indist_acc", min_metric=0.005)["learns"]
    assert not diagnose.learning_summary(h, 32, baseline_loss=1.1)["learns"]  # a stronger baseline


def test_loss_stuck_above_5():
    assert not diagnose.detect_loss_stuck(history([7.6, 6.0, 5.4]), warmup_steps=100)["passed"]
    assert diagnose.detect_loss_stuck(history([7.6, 6.0, 4.8]), warmup_steps=100)["passed"]
    assert diagnose.detect_loss_stuck(history([7.6]), warmup_steps=100)["passed"]  # nothing after warm-up yet


def test_non_finite_in_history_is_caught():
    assert diagnose.detect_non_finite(history([3.0, 2.0]))["passed"]
    nan = diagnose.detect_non_finite(history([3.0, float("nan")]))
    assert not nan["passed"] and nan["evidence"]["in_history"]
    nested = [{"step": 5, "val_loss": 1.0, "quant_health": {"l": {"grad_norm": float("inf")}}}]
    assert not diagnose.detect_non_finite(nested)["passed"]
    error_line = [{"kind": "error", "step": 7, "error": "non-finite loss"}]
    assert not diagnose.detect_non_finite(error_line)["passed"]


def test_non_finite_in_activations_and_gradients_is_caught():
    model = small_model()
    assert diagnose.detect_non_finite(model=model)["passed"]
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    found = diagnose.detect_non_finite(model=model)
    assert not found["passed"]
    assert "model.layers.1.mlp.up_proj" in found["evidence"]["in_activations"]
    assert found["evidence"]["in_loss"]


def real_stories(n: int = 5) -> list[str]:
    path = STORIES / "valid.txt"
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared TinyStories data)")
    text = path.read_text(encoding="utf-8")[:200_000]
    return [s.strip() for s in text.split("<|endoftext|>") if len(s.split()) > 50][:n]


LOOP = "Tom went to the park. He saw a dog. The dog was happy. " * 12
GIBBERISH = "Tim wased the blorf and sprinkeled the vundle. Mox hadded a grimble zap, splunk frizzle. " * 3


def test_repetitive_samples_flagged_and_real_stories_not():
    assert diagnose.detect_repetitive_samples(real_stories())["passed"]
    looping = diagnose.detect_repetitive_samples([LOOP, LOOP])
    assert not looping["passed"]
    assert looping["evidence"]["repeated_3gram_rate"] > 0.8
    stutter = diagnose.detect_repetitive_samples(["the the the the the the the the the the the the"])
    assert not stutter["passed"]


def test_gibberish_samples_flagged_and_real_stories_not():
    stories = real_stories()
    known = diagnose.load_word_list(str(STORIES / "train.txt"), max_chars=1_000_000)
    normal = diagnose.detect_gibberish_samples(stories, known)
    assert normal["passed"] and normal["evidence"]["unknown_share"] < 0.05
    gib = diagnose.detect_gibberish_samples([GIBBERISH], known)
    assert not gib["passed"] and "blorf" in gib["evidence"]["unknown_examples"]


def test_non_numeric_answers():
    assert diagnose.detect_non_numeric_answers(["19", " 7", "0", "144"])["passed"]
    assert not diagnose.detect_non_numeric_answers(["19", "", "+=", "1 2"])["passed"]
    lines = ["12 + 7 = 19  ok", "8 * 9 = 7=  WRONG, want 72", "3 - 1 =  WRONG, want 2"]
    assert [diagnose.answer_of(line) for line in lines] == ["19", "7=", ""]
    assert not diagnose.detect_non_numeric_answers(lines)["passed"]


def test_run_detectors_picks_what_the_inputs_allow():
    names = [d["name"] for d in diagnose.run_detectors(history([3.4, 2.0]), 32, samples=["a b c d"],
                                                        known_words={"a"}, arithmetic_answers=["1"])]
    assert names == ["not_learning", "loss_stuck_above_5", "non_finite", "init_loss", "init_weights", "weight_decay_collapse",
                     "all_parameters_updated", "repetitive_samples", "gibberish_samples", "non_numeric_answers"]


# --- verdict ----------------------------------------------------------------------------------

LEARNS = diagnose.learning_summary(history([3.5, 1.0]), 32)
STALLS = diagnose.learning_summary(history([3.5, 3.4]), 32)
PASS = [diagnose.result("weights_ternary", True, {}), diagnose.result("residual_paths", True, {})]


def test_verdict_broken_when_a_probe_fails_names_the_bug():
    probes = [diagnose.result("weights_ternary", False, {"zero_share": 1.0}, "wrong_weight_scale"), PASS[1]]
    v = diagnose.make_verdict(probes, LEARNS, LEARNS, [])
    assert v["verdict"] == "BROKEN"
    assert v["failed_checks"] == ["weights_ternary"] and v["suspected_bugs"] == ["wrong_weight_scale"]
    assert v["evidence"]["failed_probes"]["weights_ternary"] == {"zero_share": 1.0}


def test_verdict_twin_learns_ternary_does_not_is_broken_with_cause():
    stuck = diagnose.detect_loss_stuck(history([7.0, 6.0]), 100)
    v = diagnose.make_verdict(PASS, STALLS, LEARNS, [stuck])
    assert v["verdict"] == "BROKEN"
    assert v["failed_checks"] == ["ternary_not_learning_while_twin_learns", "loss_stuck_above_5"]
    assert v["suspected_bugs"] == []


def test_verdict_ok_inconclusive_and_no_twin_cases():
    assert diagnose.make_verdict(PASS, LEARNS, LEARNS, [])["verdict"] == "OK"
    neither = diagnose.make_verdict(PASS, STALLS, STALLS, [])
    assert neither["verdict"] == "INCONCLUSIVE" and "not BitNet" in neither["evidence"]["reason"]
    assert diagnose.make_verdict(PASS, LEARNS, None, [])["verdict"] == "OK"
    assert diagnose.make_verdict(PASS, STALLS, None, [])["verdict"] == "INCONCLUSIVE"
    twin_fails = diagnose.make_verdict(PASS, LEARNS, STALLS, [])
    assert twin_fails["verdict"] == "OK" and "twin_not_learning" in twin_fails["evidence"]["warnings"]


def test_verdict_nan_run_does_not_count_as_learning():
    nan = diagnose.detect_non_finite([{"step": 10, "val_loss": float("nan")}])
    v = diagnose.make_verdict(PASS, LEARNS, LEARNS, [nan])
    assert v["verdict"] == "BROKEN" and "non_finite" in v["failed_checks"]


# --- no BROKEN from a near-miss: the ternary model and its twin on one scale ----------------------

def arithmetic_summary(loss: float, acc: float, step: int = 300) -> dict:
    """learning_summary() of an arithmetic run as the task judges it (an accuracy floor of 10%)."""
    h = [{"step": 0, "val_loss": 3.58, "indist_acc": 0.0}, {"step": step, "val_loss": loss, "indist_acc": acc}]
    return diagnose.learning_summary(h, 32, 100, metric="indist_acc", min_metric=0.1)


def test_a_near_miss_on_the_accuracy_floor_is_inconclusive_not_broken():
    # measured: train_bitnet_arithmetic.py --max-steps 300 --twin --seed 7 (bigram loss 1.27 of the answers)
    ternary, twin = arithmetic_summary(0.734, 0.095), arithmetic_summary(0.663, 0.139)
    assert not ternary["learns"] and twin["learns"]
    v = diagnose.make_verdict(PASS, ternary, twin, [], baseline_loss=1.267)
    assert v["verdict"] == "INCONCLUSIVE" and "train longer" in v["evidence"]["reason"]
    assert v["evidence"]["progress"]["share"] == pytest.approx((1.267 - 0.734) / (1.267 - 0.663))
    # a ternary model whose layers pass no gradient (measured: no_ste, 1.20 at 300 steps) while its twin learns
    stuck = arithmetic_summary(1.203, 0.009)
    v = diagnose.make_verdict(PASS, stuck, twin, [], baseline_loss=1.267)
    assert v["verdict"] == "BROKEN" and v["failed_checks"][0] == "ternary_not_learning_while_twin_learns"
    # the same gap, judged inside warm-up or against a twin that has not moved, is not decisive
    early = diagnose.learning_summary([{"step": 0, "val_loss": 3.5}, {"step": 50, "val_loss": 3.4}], 32, 100)
    assert diagnose.make_verdict(PASS, early, twin, [], baseline_loss=1.267)["verdict"] == "INCONCLUSIVE"
    barely = arithmetic_summary(1.1, 0.12)
    assert diagnose.make_verdict(PASS, stuck, barely, [], baseline_loss=1.267)["verdict"] == "INCONCLUSIVE"


def test_the_baseline_is_the_previous_tokens_guess_where_the_sample_allows():
    task = ArithmeticTask(BitNetConfigArithmetic(operators="+"))
    base = context_free_baseline(task.get_batch)
    assert base["kind"] == "bigram" and 0 < base["loss"] < context_free_baseline(task.get_batch, 1, 4)["loss"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5000, (32, 65), generator=g)  # too few tokens per pair for a bigram: unigram
    sparse = context_free_baseline(lambda step, n: (ids[:, :-1], ids[:, 1:]), n_batches=1)
    assert sparse["kind"] == "unigram" and sparse["loss"] > 7  # the in-sample bigram would read ~0


def test_overall_word_follows_the_verdict_and_the_bar(capsys):
    thresholds = ArithmeticTask.thresholds
    def summary(bar, loss_end=0.01):
        return {"loss_start": 3.5, "loss_end": loss_end, "completions": ["x"] * 20, "completions_ok": 20, "bar": bar,
                "bar_short": [] if bar else ["heldout_acc_+ = 97.0% < 99%"], "time_budget_s": 480.0, "steps": 1000}
    for bar, verdict, word in [(True, "OK", "PASS"), (False, "OK", "INCONCLUSIVE"), (False, "INCONCLUSIVE", "INCONCLUSIVE"),
                               (True, "BROKEN", "FAIL"), (False, "BROKEN", "FAIL")]:
        out = conclude({"ternary": summary(bar), "fp": summary(True)}, {"verdict": verdict}, thresholds)
        text = capsys.readouterr().out
        assert out["overall"] == word and f"OVERALL: {word}" in text and f"(c) infrastructure verdict: {verdict}" in text
        assert "(a) the seed's criteria: answer loss" in text and "(b) our bar, >= 99%" in text
        if word == "INCONCLUSIVE" and verdict == "OK":
            assert "train longer: --time-budget 16m" in text  # twice the 8-minute budget
        if bar and verdict == "BROKEN":
            assert "yet a check failed" in text  # the apparent contradiction is explained
    for loss in (0.01, 2.0):  # a stack whose checks pass never FAILs
        assert conclude({"ternary": summary(False, loss)}, {"verdict": "OK"}, thresholds)["overall"] != "FAIL"


# --- severity, deviations, symptoms -------------------------------------------------------------

def test_each_fault_carries_its_severity_and_a_deviation_alone_is_not_broken():
    grid = diagnose.result("activations_int8", False, {"finding": "scale 128/max|x|: the largest value clips by one level"},
                           "act_grid_128")
    v = diagnose.make_verdict([grid, PASS[1]], LEARNS, LEARNS, [])
    assert v["verdict"] == "OK" and v["faults"] == []
    assert v["deviations"] == [{"part": "layer", "problem": "act_grid_128", "check": "activations_int8",
                                "measured": "scale 128/max|x|: the largest value clips by one level"}]
    measured = diagnose.result("weights_ternary", True, {"deviations": [{"problem": "per_row_weight_scale",
                                                                         "measured": 0.31}]})
    assert diagnose.make_verdict([measured], LEARNS)["deviations"][0]["measured"] == 0.31
    layer = diagnose.result("weights_ternary", False, {"zero_share": 1.0}, "binary_not_ternary")
    nan = diagnose.result("ste_gradients", False, {}, "no_ste")
    v = diagnose.make_verdict([layer, nan, grid], LEARNS, LEARNS, [])
    assert v["verdict"] == "BROKEN" and [(f["problem"], f["severity"]) for f in v["faults"]] == [
        ("no_ste", "fatal"), ("binary_not_ternary", "harmful")]  # fatal first
    assert [d["problem"] for d in v["deviations"]] == ["act_grid_128"]


def test_parameters_without_gradient_are_a_symptom_and_outside_the_optimizer_a_fault():
    logged = {"type": "AdamW", "decoupled_weight_decay": True, "max_weight_decay": 0.1}
    zero_grad = [{"step": 300, "val_loss": 1.0, "params_unchanged": ["mlp.norm.weight"],
                  "optimizer": {**logged, "params_not_in_optimizer": [], "n_params_not_in_optimizer": 0}}]
    outside = [{"step": 300, "val_loss": 1.0, "params_unchanged": ["mlp.norm.weight"],
                "optimizer": {**logged, "params_not_in_optimizer": ["mlp.norm.weight"], "n_params_not_in_optimizer": 1}}]
    assert diagnose.detect_params_not_updated(zero_grad)["suspected_bug"] == "params_without_gradient"
    assert diagnose.detect_params_not_updated(outside)["suspected_bug"] == "params_not_in_optimizer"
    norm = diagnose.result("all_parameters_trained", False, {"finding": "a norm built in forward"}, "norm_in_forward")
    v = diagnose.make_verdict([norm], LEARNS, None, [diagnose.detect_params_not_updated(zero_grad)])
    assert v["suspected_bugs"] == ["norm_in_forward"]  # the zero gradient is its consequence
    alone = diagnose.make_verdict(PASS, LEARNS, None, [diagnose.detect_params_not_updated(zero_grad)])
    assert alone["verdict"] == "BROKEN" and alone["suspected_bugs"] == ["params_without_gradient"]


@pytest.mark.parametrize("bug", ["norm_in_forward", "wrong_scale"])
def test_injected_bugs_that_stop_a_gradient_get_no_optimizer_name(tmp_path, bug):
    cfg = BitNetConfigArithmetic(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=4, batch_size=8, max_steps=6, warmup_steps=2, eval_interval=3,
                                 eval_problems=4, operators="+", dtype="fp32", compile=False, stop_when_solved=False,
                                 inject_bug=bug)
    out = train(cfg, ArithmeticTask(cfg), str(tmp_path), device="cpu", quiet=True)
    v = diagnose.make_verdict(diagnose.run_probes(out["model"].eval()), diagnose.learning_summary(out["history"], 32),
                              None, diagnose.run_detectors(out["history"], 32))
    assert v["verdict"] == "BROKEN" and v["suspected_bugs"] == [BUGS[bug].problem]


# --- causes before consequences -----------------------------------------------------------------

class EpsScaleBitLinear(BitLinear):
    """absmean with a tiny eps added, not clamped at 1e-5 (w / (mean|W| + 1e-8)), as published code
    writes it: the recipe's output at any healthy weight scale, another once mean|W| falls below 1e-5."""

    def forward(self, x):
        gamma = self.weight.abs().mean()
        w_q = (self.weight / (gamma + 1e-8)).round().clamp(-1, 1) * gamma
        return nn.functional.linear(ste(x, activation_quant(x)), ste(self.weight, w_q))


def with_layer(model, cls):
    for m in model.modules():
        if type(m) is BitLinear:
            m.__class__ = cls
    model.linear_cls = cls
    return model


def test_a_layer_is_blamed_only_for_what_healthy_weights_still_show():
    model = with_layer(small_model(), EpsScaleBitLinear)
    assert failing(diagnose.run_layer_probes(model)) == {}  # correct at a healthy scale
    with torch.no_grad():
        for _, layer in diagnose.quantized_layers(model):
            layer.weight.mul_(1e-4)  # RMS ~2e-6: the collapse a coupled L2 decay reaches
    results = diagnose.run_layer_probes(model)
    failed = [r for r in results if not r["passed"]]
    assert failed and all(r["suspected_bug"] is None and r["evidence"]["consequence_of_weights"]["would_name"]
                          for r in failed)
    # a real fault survives healthy weights
    broken = small_model("wrong_scale")
    with torch.no_grad():
        for _, layer in diagnose.quantized_layers(broken):
            layer.weight.mul_(1e-4)
    assert failing(diagnose.run_layer_probes(broken))["weights_ternary"] == "wrong_weight_scale"


def test_coupled_l2_adam_that_collapses_the_weights_is_the_fault_not_the_layer(tmp_path):
    cfg = BitNetConfigArithmetic(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=4, batch_size=8, max_steps=200, warmup_steps=5, eval_interval=100,
                                 eval_problems=4, operators="+", dtype="fp32", compile=False, stop_when_solved=False,
                                 inject_bug="coupled_weight_decay", weight_decay=10.0, learning_rate=3e-3)
    task = ArithmeticTask(cfg)
    out = train(cfg, task, str(tmp_path), device="cpu", quiet=True)
    assert out["history"][-1]["weight_rms"] < 1e-4  # collapsed, > 100x
    model = with_layer(out["model"].eval(), EpsScaleBitLinear)  # the user's layer, same trained weights
    v = diagnose_run(model, out["history"], task=task, log=lambda *a: None, stack={"parts": {"layer": "my:Layer"}},
                     **task.diagnosis_inputs(model))
    assert v["verdict"] == "BROKEN" and v["faults"][0]["problem"] == "coupled_weight_decay"
    assert all(f["part"] != "layer" for f in v["faults"])
    assert v["evidence"]["consequences"] and all(c["of"] == ["coupled_weight_decay"]
                                                 for c in v["evidence"]["consequences"].values())
    statement = v["your_stack"]["statement"]
    assert "the fault is the optimizer: coupled_weight_decay" in statement and "consequence" in statement
    assert "your layer:" not in statement


def test_a_collapsed_init_is_the_fault_not_the_layer():
    model = with_layer(small_model(), EpsScaleBitLinear)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(1e-5)  # initialised to ~0
    signals = TrainingSignals(model, torch.optim.AdamW(model.parameters()))
    history = [{"step": 0, "val_loss": math.log(32), **signals(model, 0, None, None)},
               {"step": 100, "val_loss": 3.4, **signals(model, 100, 3.4, 3.4)}]
    v = diagnose.make_verdict(diagnose.run_probes(model), diagnose.learning_summary(history, 32), None,
                              diagnose.run_detectors(history, 32))
    assert v["verdict"] == "BROKEN" and v["faults"][0]["problem"] == "init_scale_too_small"
    assert all(f["part"] != "layer" for f in v["faults"]) and v["evidence"]["consequences"]


def test_write_verdict_is_atomic_json(tmp_path):
    v = diagnose.make_verdict(PASS, LEARNS, LEARNS, [])
    path = diagnose.write_verdict(str(tmp_path / "out"), v)
    assert json.loads(Path(path).read_text())["verdict"] == "OK"
    assert os.listdir(tmp_path / "out") == ["verdict.json"]


# --- quantization health ----------------------------------------------------------------------

def hand_made_model():
    """Embedding -> BitLinear(4, 2): every number the tracker reports can be worked out by hand."""
    emb, layer = nn.Embedding(2, 4), BitLinear(4, 2)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0],     # one-hot: 1 of 4 entries at the clamp
                                       [1.0, -1.0, 1.0, -1.0]]))  # all 4 entries at +-127
        # mean|W| = 8.15 / 8; W*s rounds to [[1, -1, 0, 1], [-1, 0, 1, -1]]: 3/8 -1, 2/8 0, 3/8 +1
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 0.1, 2.0], [-2.0, 0.05, 1.0, -1.0]]))
    return nn.Sequential(emb, layer), layer


def test_health_tracker_numbers_on_a_hand_made_layer():
    model, layer = hand_made_model()
    ids = torch.tensor([[0, 0, 1, 1]])  # 2 tokens with 1/4 saturated, 2 with 4/4: 5/8
    labels = torch.tensor([[0, 1, 0, 1]])
    tracker = diagnose.QuantHealthTracker(lambda: (ids, labels))
    out = tracker(model, step=0)
    stats = out["quant_health"]["1"]
    assert (stats["frac_neg"], stats["frac_zero"], stats["frac_pos"]) == (3 / 8, 2 / 8, 3 / 8)
    mean_abs = 8.15 / 8
    assert stats["weight_scale"] == pytest.approx(mean_abs)
    assert stats["latent_mean_abs"] == pytest.approx(mean_abs)
    assert stats["flip_rate"] is None and out["qh_flip_rate"] is None
    assert stats["act_saturation"] == pytest.approx(5 / 8)
    # both inputs quantize exactly, so the ratio is ||x W_q^T|| / ||x W^T|| over the batch
    x = model[0](ids).detach()
    w_q = torch.tensor([[1.0, -1.0, 0.0, 1.0], [-1.0, 0.0, 1.0, -1.0]]) * mean_abs
    want_ratio = float((x @ w_q.T).norm() / (x @ layer.weight.detach().T).norm())
    assert stats["out_ratio"] == pytest.approx(want_ratio, rel=1e-5)
    # STE: dLoss/dW = g^T x_q, with g the gradient at the layer output
    logits = (x @ w_q.T).detach().requires_grad_(True)
    nn.functional.cross_entropy(logits[0], labels[0]).backward()
    assert stats["grad_norm"] == pytest.approx(float((logits.grad[0].T @ x[0]).norm()), rel=1e-5)

    with torch.no_grad():
        layer.weight[0, 2] = -0.9  # 0 -> -1
        layer.weight[1, 1] = 0.8  # 0 -> +1
    out = tracker(model, step=10)
    assert out["quant_health"]["1"]["flip_rate"] == pytest.approx(2 / 8 / 10)
    assert out["quant_health"]["1"]["frac_zero"] == 0.0
    assert "no zero weights" in diagnose.summarise_quant_health(tracker.history)
    assert json.loads(json.dumps(out)) == out  # JSON-able, as metrics.jsonl needs


def test_health_tracker_on_models_and_its_summary():
    tracker = diagnose.QuantHealthTracker()
    out = tracker(small_model(), 0)
    assert len(out["quant_health"]) == 14
    assert 0.25 < out["qh_frac_zero"] < 0.4 and 0.5 < out["qh_out_ratio_min"] <= out["qh_out_ratio_max"] < 1.0
    assert out["qh_grad_norm_min"] > 0
    text = tracker.summarise()
    assert "model.layers.1.mlp.down_proj" in text and "flags: none" in text
    broken = diagnose.QuantHealthTracker()(small_model("wrong_scale"), 0)
    assert broken["qh_frac_zero"] == 1.0 and broken["qh_out_ratio_max"] == 0.0
    assert "almost all weights are zero" in diagnose.summarise_quant_health([broken])
    assert diagnose.QuantHealthTracker()(small_model(quant="none"), 0) == {"quant_health": {}}


def test_health_tracker_works_as_the_trainers_on_eval_hook(tmp_path):
    from bitnet.data_arithmetic import ArithmeticTask
    from bitnet.trainer import train

    cfg = tiny_arithmetic_config(max_steps=4)
    task = ArithmeticTask(cfg)
    tracker = diagnose.QuantHealthTracker(lambda: task.get_batch(0, 4))
    train(cfg, task, str(tmp_path), device="cpu", on_eval=tracker, quiet=True)
    _, evals = diagnose.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert evals[-1]["qh_flip_rate"] is not None and len(evals[-1]["quant_health"]) == 7


# --- pictures and the command line ------------------------------------------------------------

def tiny_arithmetic_config(**overrides) -> BitNetConfigArithmetic:
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4, batch_size=8, max_steps=4, warmup_steps=2, eval_interval=2,
                  eval_problems=4, operators="+", dtype="fp32")
    return BitNetConfigArithmetic(**{**fields, **overrides})


def synthetic_metrics(path: Path, losses, with_health=True):
    lines = []
    for i, loss in enumerate(losses):
        step = 10 * i
        lines.append({"kind": "train", "step": step + 5, "train_loss": loss + 0.1})
        entry = {"kind": "eval", "step": step, "val_loss": loss}
        if with_health:
            entry["quant_health"] = {f"model.layers.0.mlp.{p}": {"frac_neg": 0.34, "frac_zero": 0.3 + 0.01 * i,
                                                                 "frac_pos": 0.36 - 0.01 * i}
                                     for p in ("gate_proj", "up_proj", "down_proj")}
        lines.append(entry)
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))
    return str(path)


def test_plots_are_non_empty_pngs(tmp_path):
    ternary = synthetic_metrics(tmp_path / "t.jsonl", [3.4, 2.5, 1.9])
    twin = synthetic_metrics(tmp_path / "f.jsonl", [3.4, 2.2, 1.5], with_health=False)
    for path in (diagnose.plot_loss_curves({"ternary": ternary, "fp twin": twin}, str(tmp_path / "loss.png")),
                 diagnose.plot_ternary_fractions(ternary, str(tmp_path / "fractions.png"))):
        data = Path(path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="no quant_health"):
        diagnose.plot_ternary_fractions(twin, str(tmp_path / "none.png"))


def test_diagnose_run_writes_verdict_and_pictures(tmp_path):
    ternary = synthetic_metrics(tmp_path / "t.jsonl", [3.4, 2.5, 1.9])
    twin = synthetic_metrics(tmp_path / "f.jsonl", [3.4, 2.2, 1.5], with_health=False)
    logged = []
    verdict = diagnose.diagnose_run(small_model("no_ste"), diagnose.read_metrics(ternary)[1],
                                    diagnose.read_metrics(twin)[1], out_dir=str(tmp_path / "out"),
                                    metrics_paths={"ternary": ternary, "fp twin": twin}, log=logged.append)
    assert verdict["verdict"] == "BROKEN" and verdict["suspected_bugs"] == ["no_ste"]
    assert sorted(os.listdir(tmp_path / "out")) == ["loss_curves.png", "ternary_fractions.png", "verdict.json"]
    assert any("INFRASTRUCTURE BROKEN" in line for line in logged)


def test_cli_on_a_twin_run(tmp_path, capsys):
    from bitnet.data_arithmetic import ArithmeticTask
    from bitnet.trainer import train

    for quant, sub in (("ternary", "ternary"), ("none", "fp")):
        cfg = tiny_arithmetic_config(quant=quant)
        task = ArithmeticTask(cfg)
        train(cfg, task, str(tmp_path / sub), device="cpu", quiet=True,
              on_eval=diagnose.QuantHealthTracker(lambda: task.get_batch(0, 4)))
    verdict = diagnose.main(["--checkpoint", str(tmp_path), "--write"])
    printed = capsys.readouterr().out
    # 4 steps teach neither model anything: not BitNet's fault, and the probes all pass
    assert verdict["verdict"] == "INCONCLUSIVE" and verdict["suspected_bugs"] == []
    assert all(verdict["evidence"]["probes"].values())
    assert "quantization health at step 4" in printed and "verdict: INCONCLUSIVE" in printed
    for name in ("verdict.json", "loss_curves.png", "ternary_fractions.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_cli_names_the_bug_of_a_broken_checkpoint(tmp_path, capsys):
    from bitnet.data_arithmetic import ArithmeticTask
    from bitnet.trainer import train

    cfg = tiny_arithmetic_config(inject_bug="residual_bug", max_steps=2)
    train(cfg, ArithmeticTask(cfg), str(tmp_path), device="cpu", quiet=True)
    verdict = diagnose.main(["--checkpoint", str(tmp_path / "ckpt.pt")])
    assert verdict["verdict"] == "BROKEN" and verdict["suspected_bugs"] == ["residual_bug"]
    assert "INFRASTRUCTURE BROKEN" in capsys.readouterr().out


def test_cli_bad_path_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        diagnose.main(["--checkpoint", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint at") and err.count("\n") == 1


@pytest.mark.parametrize("layer, named", [
    ("SignNoRescaleLinear", {"binary_not_ternary", "binary_activations", "missing_rescale"}),
    ("OutputQuantNoRescaleLinear", {"quantizes_output", "per_tensor_act_scale", "missing_rescale"}),
    # wrong_norm_scale is named by output_matches_recipe alone, beside its first problem
    ("SignNormInForwardLinear", {"binary_not_ternary", "wrong_norm_scale", "norm_in_forward"}),
])
def test_a_model_whose_layers_hold_several_faults_has_every_one_named(layer, named):
    """One layer class with several faults, in every projection of our model: the verdict names each
    of them (not only the worst), as check_layer does on the layer alone."""
    from bitnet.spec import resolve_spec
    cls = resolve_spec(f"{Path(__file__).parent / 'fixtures' / 'third_party_layers.py'}:{layer}")
    torch.manual_seed(0)
    model = BitNetForCausalLM(BitNetConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=4), linear_cls=cls)
    v = diagnose.make_verdict(diagnose.run_layer_probes(model), LEARNS, LEARNS, [])
    assert v["verdict"] == "BROKEN"
    assert named <= set(v["suspected_bugs"]), v["suspected_bugs"]
    assert all(f["part"] == "layer" for f in v["faults"] if f["problem"] in named)
