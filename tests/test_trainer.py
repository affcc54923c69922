"""The shared trainer end to end on CPU: a tiny model learns arithmetic in both quant
modes, teacher-forced accuracy equals real greedy decoding, resume is exact, checkpoints
are atomic, bad inputs give one-line errors, and a non-finite loss stops the run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bitnet.config_tiny import BitNetConfig, BitNetConfigArithmetic, BitNetConfigTiny
from bitnet.arithmetic_codec import CharTokenizer
from bitnet.data_arithmetic import ArithmeticTask
from conftest import assert_dicts_close
from bitnet.build import pick_device
from bitnet.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from bitnet.errors import NonFiniteLoss, TrainingError
from bitnet.schedule import lr_and_wd
from bitnet.trainer import train

TOK = CharTokenizer()
TIMING_KEYS = ("tokens_per_s", "elapsed_s")


def read_metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timing(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in entries]


def no_temp_files(out_dir) -> bool:
    return not [n for n in os.listdir(out_dir) if ".tmp" in n]


def answer(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // max(b, 1)}[op]


# ---------------------------------------------------------------- learning, both quant modes
@pytest.fixture(scope="module")
def trained(arith_cfg, tmp_path_factory):
    """One 200-step run per quant mode ('*' with operands 0-5), trained on first use."""
    runs = {}

    def get(quant):
        if quant not in runs:
            cfg = arith_cfg(quant=quant)
            out = tmp_path_factory.mktemp(f"learn_{quant}")
            runs[quant] = (cfg, str(out), train(cfg, ArithmeticTask(cfg), str(out), device="cpu", quiet=True))
        return runs[quant]

    return get


@pytest.mark.parametrize("quant", ["ternary", "none"])
def test_tiny_model_learns_arithmetic(trained, quant):
    cfg, out_dir, r = trained(quant)
    start, final = r["history"][0], r["final"]
    assert start["step"] == 0 and final["step"] == cfg.max_steps
    assert start["indist_answer_loss"] > 2.0  # ~ln(32) before training
    assert final["indist_answer_loss"] < 0.25 and final["indist_answer_loss"] < start["indist_answer_loss"] / 10
    assert r["last_train_loss"] < 0.1 * r["first_train_loss"]
    assert start["indist_acc_*"] < 0.2 and final["indist_acc_*"] >= 0.9, final
    assert r["model"].config.quant == quant
    # the log: evaluations at 0 and the end, a train line every 10 steps, nothing else
    log = read_metrics(out_dir)
    assert [e["step"] for e in log if e["kind"] == "eval"] == [0, cfg.max_steps]
    assert [e["step"] for e in log if e["kind"] == "train"] == list(range(10, cfg.max_steps + 1, 10))
    assert no_temp_files(out_dir)


def greedy_is_right(model, a, op, b) -> bool:
    """Real greedy decoding from the prompt a user types: it must produce exactly ' c\\n'."""
    prompt = torch.tensor([TOK.encode(f"{a} {op} {b} =")])
    out = model.generate(prompt, 8, stop_token=TOK.newline_id)
    return out[0, prompt.shape[1]:].tolist() == TOK.encode(f" {answer(a, op, b)}\n", bos=False)


def test_teacher_forced_accuracy_equals_greedy_decoding(trained):
    cfg, _, r = trained("ternary")
    task, model = ArithmeticTask(cfg), r["model"].eval()
    problems = [(a, "*", b) for a in range(6) for b in range(6)]  # the trained domain
    problems += [(a, "*", b) for a in range(5, 12) for b in (3, 7, 11)]  # beyond it
    problems += [(a, op, b) for a, b in ((3, 4), (9, 9), (12, 5)) for op in "+-"]  # never trained
    hits, _ = task.accuracy(model, problems, "cpu")
    greedy = [greedy_is_right(model, *p) for p in problems]
    assert hits == greedy
    assert 30 <= sum(hits) < len(problems)  # both outcomes occur, so the comparison means something
    # the task's own completion helper agrees as well
    assert [task.complete(model, f"{a} {op} {b} =", "cpu").strip() == str(answer(a, op, b))
            for a, op, b in problems] == greedy


def test_checkpoint_contents_and_reload(trained):
    cfg, out_dir, r = trained("ternary")
    ckpt = load_checkpoint(out_dir)
    assert ckpt["step"] == cfg.max_steps and ckpt["task"] == ArithmeticTask(cfg).identity()
    assert ckpt["task"]["tokenizer"] == TOK.identity and ckpt["config_class"] == "BitNetConfigArithmetic"
    assert {"model", "optimizer", "config", "rng_state"} <= set(ckpt)
    model = model_from_checkpoint(ckpt)
    ids = torch.tensor([TOK.encode("3 * 4 = 12")])
    with torch.no_grad():
        assert torch.equal(model(ids)[0], r["model"].eval()(ids)[0])


# ---------------------------------------------------------------- resume
class Crash(Exception):
    pass


class CrashingTask(ArithmeticTask):
    """Dies when asked for the batch of `crash_at`: a run killed between two checkpoints."""

    def __init__(self, cfg, crash_at):
        super().__init__(cfg)
        self.crash_at = crash_at

    def get_batch(self, step, batch_size):
        if step == self.crash_at:
            raise Crash(step)
        return super().get_batch(step, batch_size)


def resume_cfg(arith_cfg, **kw):
    return arith_cfg(max_steps=40, eval_interval=20, warmup_steps=5, eval_problems=16, **kw)


def assert_same_run(a_dir, a, b_dir, b):
    assert a["final"]["step"] == b["final"]["step"]
    assert_dicts_close(a["final"], b["final"])
    assert len(a["history"]) == len(b["history"])
    for ha, hb in zip(a["history"], b["history"]):
        assert_dicts_close(ha, hb)
    la, lb = without_timing(read_metrics(a_dir)), without_timing(read_metrics(b_dir))
    keys = [(e["kind"], e["step"]) for e in la]
    assert len(keys) == len(set(keys)), "duplicated entries in metrics.jsonl"
    assert keys == [(e["kind"], e["step"]) for e in lb], "stale or missing entries in metrics.jsonl"
    for ea, eb in zip(la, lb):
        assert_dicts_close(ea, eb)
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    assert all(torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-7) for k in sa)
    assert no_temp_files(a_dir) and no_temp_files(b_dir)


def test_resume_after_a_crash_matches_an_uninterrupted_run(arith_cfg, tmp_path):
    cfg = resume_cfg(arith_cfg)
    full = train(cfg, ArithmeticTask(cfg), str(tmp_path / "full"), device="cpu", quiet=True)
    run = str(tmp_path / "crashed")
    with pytest.raises(Crash):
        train(cfg, CrashingTask(cfg, crash_at=35), run, device="cpu", quiet=True)
    assert load_checkpoint(run)["step"] == 20
    assert 30 in [e["step"] for e in read_metrics(run)]  # logged after the checkpoint: must be dropped
    resumed = train(cfg, ArithmeticTask(cfg), run, device="cpu", resume=True, quiet=True)
    assert resumed["final"]["step"] == 40
    assert_same_run(run, resumed, str(tmp_path / "full"), full)


def test_resume_to_more_steps_matches_a_longer_run(arith_cfg, tmp_path):
    # a flat schedule after warmup, so a 20-step run is the first half of a 40-step one
    cfg = resume_cfg(arith_cfg, min_lr_ratio=1.0)
    full = train(cfg, ArithmeticTask(cfg), str(tmp_path / "full"), device="cpu", quiet=True)
    run = str(tmp_path / "short")
    short = cfg.with_overrides(["max_steps=20"])
    assert train(short, ArithmeticTask(short), run, device="cpu", quiet=True)["final"]["step"] == 20
    resumed = train(cfg, ArithmeticTask(cfg), run, device="cpu", resume=True, quiet=True)
    assert_same_run(run, resumed, str(tmp_path / "full"), full)


def test_resume_refuses_a_changed_config_or_a_missing_checkpoint(arith_cfg, tmp_path):
    cfg = arith_cfg(max_steps=2, eval_interval=2, eval_problems=4)
    with pytest.raises(TrainingError) as e:
        train(cfg, ArithmeticTask(cfg), str(tmp_path), device="cpu", resume=True, quiet=True)
    assert "\n" not in str(e.value) and "no checkpoint" in str(e.value)
    train(cfg, ArithmeticTask(cfg), str(tmp_path), device="cpu", quiet=True)
    changed = cfg.with_overrides(["learning_rate=1e-3", "max_steps=4"])
    with pytest.raises(TrainingError, match="learning_rate") as e:
        train(changed, ArithmeticTask(changed), str(tmp_path), device="cpu", resume=True, quiet=True)
    assert "\n" not in str(e.value) and "max_steps" not in str(e.value)


# ---------------------------------------------------------------- checkpoint files
def test_checkpoint_write_is_atomic_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": {}, "config": {}, "step": 1}, path)
    assert no_temp_files(tmp_path) and not (tmp_path / "ckpt.prev.pt").exists()
    save_checkpoint({"model": {}, "config": {}, "step": 2}, path)
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(str(tmp_path / "ckpt.prev.pt"))["step"] == 1
    before = {n: (tmp_path / n).read_bytes() for n in ("ckpt.pt", "ckpt.prev.pt")}

    def broken_save(obj, f, *args, **kwargs):  # dies half-way through writing: the disk is full
        f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(TrainingError) as e:
        save_checkpoint({"model": {}, "config": {}, "step": 3}, path)
    monkeypatch.undo()
    assert "disk full: could not write the checkpoint" in str(e.value) and "\n" not in str(e.value)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before  # both checkpoints intact
    assert no_temp_files(tmp_path)


def test_bad_or_missing_checkpoint_is_a_one_line_error(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "config": {}}, good)
    data = good.read_bytes()
    cases = {"missing_dir": tmp_path / "nope", "empty_dir": tmp_path / "empty"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for name in ("garbage.pt", "truncated.pt", "foreign.pt", "list.pt"):
        cases[name] = tmp_path / name
    for name, path in cases.items():
        with pytest.raises(TrainingError) as e:
            load_checkpoint(str(path))
        msg = str(e.value)
        assert msg and "\n" not in msg and str(path) in msg, f"{name}: {msg!r}"
    assert load_checkpoint(str(good))["config"] == {}


# ---------------------------------------------------------------- failures
def test_non_finite_loss_stops_with_a_training_error(arith_cfg, tmp_path):
    cfg = arith_cfg(learning_rate=1e6, warmup_steps=1, max_steps=30, eval_interval=100, eval_problems=4)
    with pytest.raises(NonFiniteLoss) as e:
        train(cfg, ArithmeticTask(cfg), str(tmp_path), device="cpu", quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and "learning_rate" in msg and ("nan" in msg or "inf" in msg) and e.value.exit_code == 3
    errors = [m for m in read_metrics(tmp_path) if m["kind"] == "error"]
    assert len(errors) == 1 and errors[0]["step"] < cfg.max_steps


def test_non_finite_loss_is_caught_at_any_step(arith_cfg, tmp_path, monkeypatch):
    import bitnet.model

    real = bitnet.model.F.cross_entropy
    calls = []

    def poisoned(*args, **kwargs):  # finite for the first 5 training steps, then NaN
        loss = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # an evaluation, not a training step
            return loss
        calls.append(1)
        return loss * float("nan") if len(calls) > 5 else loss

    cfg = arith_cfg(operators="*", heldout_fraction=0.0, max_steps=20, eval_interval=100, eval_problems=4)
    monkeypatch.setattr(bitnet.model.F, "cross_entropy", poisoned)
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 5"):
        train(cfg, ArithmeticTask(cfg), str(tmp_path), device="cpu", quiet=True)


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TrainingError):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="cuda"):
            pick_device("cuda")


def test_learning_rate_schedules():
    cfg = BitNetConfig(learning_rate=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, weight_decay=0.1)
    assert lr_and_wd(cfg, 0)[0] == pytest.approx(0.1) and lr_and_wd(cfg, 9)[0] == pytest.approx(1.0)
    assert lr_and_wd(cfg, 60)[0] == pytest.approx(0.55) and lr_and_wd(cfg, 110)[0] == pytest.approx(0.1)
    lrs = [lr_and_wd(cfg, s)[0] for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    two = cfg.with_overrides(["schedule=two_stage", "two_stage_split=0.5", "two_stage_lr_ratio=0.3"])
    assert lr_and_wd(two, 54)[1] == 0.1 and lr_and_wd(two, 55)[1] == 0.0  # weight decay off in stage two
    assert lr_and_wd(two, 55)[0] == pytest.approx(0.3) and lr_and_wd(two, 54)[0] > 0.5  # the drop
    with pytest.raises(TrainingError):
        lr_and_wd(cfg.with_overrides(["schedule=linear"]), 50)


def test_cosine_restarts_give_a_second_annealing_from_a_lower_peak():
    cfg = BitNetConfig(learning_rate=1.0, min_lr_ratio=0.0, warmup_steps=10, max_steps=260, restart_steps=100,
                       restart_lr_ratio=0.5)
    lr = [lr_and_wd(cfg, s)[0] for s in range(260)]
    assert lr[10] == pytest.approx(1.0) and lr[60] == pytest.approx(0.5) and lr[109] < 0.01  # cycle 1: 100 steps
    assert lr[110] == pytest.approx(0.5)  # cycle 2 restarts at half the peak
    assert lr[185] == pytest.approx(0.25) and lr[259] < 0.01  # 150 steps were left: the last cycle is 150 long
    assert lr_and_wd(cfg.with_overrides(["max_steps=110"]), 60)[0] == pytest.approx(0.5)  # one cycle: plain cosine


# ---------------------------------------------------------------- config overrides and the CLI
def test_with_overrides_parses_types_and_keeps_the_class():
    base = BitNetConfigArithmetic()
    cfg = base.with_overrides(["hidden_size=64", "learning_rate=3e-4", "tie_word_embeddings=true",
                               "operators=+-", "quant=none", "dropout=0"])
    assert type(cfg) is BitNetConfigArithmetic
    assert cfg.hidden_size == 64 and type(cfg.hidden_size) is int
    assert cfg.learning_rate == 3e-4 and type(cfg.learning_rate) is float
    assert cfg.tie_word_embeddings is True and type(cfg.dropout) is float
    assert cfg.operators == "+-" and cfg.quant == "none"
    assert base.hidden_size == 256 and base.tie_word_embeddings is False  # the original is untouched
    for raw, want in (("1", True), ("yes", True), ("false", False), ("0", False)):
        assert base.with_overrides([f"tie_word_embeddings={raw}"]).tie_word_embeddings is want
    assert BitNetConfigTiny().with_overrides(["eval_tokens=0"]).eval_tokens == 0


@pytest.mark.parametrize("pair,needle", [("hidden_sise=64", "hidden_sise"), ("hidden_size=6.5", "int"),
                                         ("learning_rate=fast", "float"), ("tie_word_embeddings=maybe", "bool"),
                                         ("hidden_size", "name=value")])
def test_with_overrides_rejects_bad_pairs(pair, needle):
    with pytest.raises(ValueError) as e:
        BitNetConfigArithmetic().with_overrides([pair])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_with_overrides_rejects_another_presets_field():
    with pytest.raises(ValueError, match="eval_tokens"):  # a TinyStories field is not an arithmetic one
        BitNetConfigArithmetic().with_overrides(["eval_tokens=5"])


@pytest.mark.parametrize("bad", ["no_such_field=1", "learning_rate=abc"])
def test_train_script_bad_set_exits_2_with_one_line(repo_root, tmp_path, bad):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train_bitnet_arithmetic.py", "--out-dir", str(tmp_path / "run"),
                           "--device", "cpu", "--quiet", "--set", bad],
                          cwd=repo_root, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and bad.split("=")[0] in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "run" / "ckpt.pt")


# --- time budget and train-until-solved ---------------------------------------------------

def test_parse_duration():
    import argparse

    from bitnet.cli import parse_duration
    assert [parse_duration(t) for t in ("90s", "9m", "1.5h", "12")] == [90, 540, 5400, 12]
    for bad in ("abc", "9x", "", "-1m"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


class FakeClock:
    """time.time() for the trainer: advances `dt` seconds on every call, so the plan is exact."""

    def __init__(self, dt: float):
        self.now, self.dt = 1000.0, dt

    def time(self):
        self.now += self.dt
        return self.now


def test_time_budget_plans_steps_from_the_measured_speed(arith_cfg, monkeypatch):
    import bitnet.schedule as schedule
    cfg = arith_cfg(time_budget_s=100.0, warmup_steps=10, eval_interval=50, max_steps=7, learning_rate=1e-2)
    clock = FakeClock(0.0)
    monkeypatch.setattr(schedule, "time", clock)
    budget = schedule.TimeBudget(cfg, start_step=0)
    budget.note_eval(2.0)
    for step in range(1, 20):
        clock.now += 0.1 if step > 5 else 5.0  # slow first steps (compile), then 0.1 s a step
        assert budget.after_step(cfg, step, 0) is cfg  # no plan before warm-up ends
    clock.now += 0.1
    planned = budget.after_step(cfg, 20, 0)
    want = 20 + int((100.0 - (clock.now - 1000.0) - 2 * 2.0) / (0.1 + 2.0 / 50))
    assert planned.max_steps == want and want > 400  # the budget, not the preset's 7 steps, sets the length
    assert not budget.done and not budget.over()

    def run(cfg, steps, sec_per_step, eval_every=50):
        """Steps at `sec_per_step`, a 2 s evaluation at every multiple of 50; the plans made on the way."""
        plans = []
        for step in steps:
            clock.now += sec_per_step
            new = budget.after_step(cfg, step, 0)
            if new is not cfg:
                plans.append((step, new.max_steps, clock.now - 1000.0))
                cfg = new
            if step % eval_every == 0:
                clock.now += 2.0
                budget.note_eval(2.0)
        return cfg, plans

    # the machine gets faster (0.05 s a step): the next evaluation's plan buys more steps, from the
    # training speed since the previous plan (the evaluation's 2 s are counted apart)
    first = planned.max_steps
    planned, plans = run(planned, range(21, 101), 0.05)
    assert plans and plans[0][0] == 50 and planned.max_steps > first
    for step, steps, elapsed in plans:
        assert steps == step + int((100.0 - elapsed - 2 * 2.0) / (0.05 + 2.0 / 50))
    # late in the cosine a much slower machine would cut the plan, and so the rate, sharply: that
    # plan is refused (the hard stop still ends the run in time); past 80% of the plan, none is made
    late = int(0.7 * planned.max_steps) // 50 * 50
    planned, _ = run(planned, range(101, late + 1), 0.05)
    before = planned.max_steps
    planned, plans = run(planned, range(late + 1, late + 51), 0.5)
    assert planned.max_steps == before and plans == []
    planned, _ = run(planned, range(late + 51, int(0.85 * before) // 50 * 50 + 1), 0.05)
    assert budget.done
    assert budget.over()  # the slow stretch spent the time the refused plan would have taken back


def test_time_budget_replan_keeps_a_restart_schedule_in_its_cycle(arith_cfg, monkeypatch):
    """A re-plan that would move a run out of its restart cycle (its rate back to a peak, or down
    to the floor) is not taken."""
    import bitnet.schedule as schedule
    cfg = arith_cfg(time_budget_s=1000.0, warmup_steps=10, eval_interval=50, max_steps=4500,
                    restart_steps=2900, restart_lr_ratio=0.3, learning_rate=1e-2)
    clock = FakeClock(0.0)
    monkeypatch.setattr(schedule, "time", clock)
    budget = schedule.TimeBudget(cfg, start_step=3000)
    budget.first_plan = 3000  # as if planned before: every evaluation from here re-plans
    clock.now += 1.0
    budget.after_step(cfg, 3005, 3000)
    clock.now += 45 * 0.2
    # 0.2 s a step buys (1000 - 10) / 0.2 ~ 4,950 more steps: a longer second cycle, and a rate that
    # moves a little; at 2 s a step the plan (~500 steps) would end the second cycle's rise: refused
    faster = budget.after_step(cfg, 3050, 3000)
    assert faster is not cfg and faster.max_steps > cfg.max_steps
    clock.now += 50 * 2.0
    assert budget.after_step(faster, 3100, 3000) is faster


def test_time_budget_off_leaves_max_steps(arith_cfg):
    from bitnet.schedule import TimeBudget
    cfg = arith_cfg(max_steps=30)
    budget = TimeBudget(cfg, 0)
    assert all(budget.after_step(cfg, s, 0) is cfg for s in range(1, 40)) and not budget.over()


def test_time_budget_run_stops_in_time_and_records_its_plan(arith_cfg, tmp_path):
    import time
    cfg = arith_cfg(time_budget_s=6.0, max_steps=100_000, warmup_steps=10, eval_interval=100_000)
    t0 = time.time()
    result = train(cfg, ArithmeticTask(cfg), str(tmp_path), device="cpu", quiet=True)
    took = time.time() - t0
    assert 20 < result["max_steps"] < 100_000 and result["final"]["step"] <= result["max_steps"]
    assert took < 6.0 + 10.0, f"a 6 s budget took {took:.0f} s"  # generous: the machine is shared
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["step"] == result["final"]["step"] and ckpt["train_state"]["planned_max_steps"] == result["max_steps"]
    # a resume trains to the plan it made, and its checkpoints keep that plan for the next resume
    again = train(cfg, ArithmeticTask(cfg), str(tmp_path), device="cpu", quiet=True, resume=True)
    assert again["max_steps"] == result["max_steps"] and again["final"]["step"] == result["max_steps"]
    assert load_checkpoint(str(tmp_path))["train_state"]["planned_max_steps"] == result["max_steps"]


def test_stop_when_solved_stops_at_the_first_solved_evaluation(arith_cfg, tmp_path):
    class SolvedAtStep40(ArithmeticTask):
        solve_target = 1.0

        def solved(self, m):
            return m["step"] >= 40

    cfg = arith_cfg(max_steps=200, eval_interval=20, stop_when_solved=True)
    result = train(cfg, SolvedAtStep40(cfg), str(tmp_path), device="cpu", quiet=True)
    assert result["final"]["step"] == 40 and result["solved"]
    assert load_checkpoint(str(tmp_path))["step"] == 40
    off = train(arith_cfg(max_steps=60, eval_interval=20), SolvedAtStep40(cfg), str(tmp_path / "off"),
                device="cpu", quiet=True)
    assert off["final"]["step"] == 60 and not off["solved"]  # stop_when_solved=False trains on
    # Solved with less than one evaluation interval left: the schedule's end is trained, not skipped.
    near_end = train(arith_cfg(max_steps=50, eval_interval=20, stop_when_solved=True), SolvedAtStep40(cfg),
                     str(tmp_path / "near_end"), device="cpu", quiet=True)
    assert [h["step"] for h in near_end["history"]] == [0, 20, 40, 50] and near_end["solved"]


def test_fp_twin_trains_at_its_own_learning_rate():
    from bitnet.cli import build_config, common_parser
    p = common_parser("t", gpu_preset="arithmetic", cpu_preset="arithmetic-cpu")
    base = ["--out-dir", "x", "--preset", "arithmetic-cpu", "--set", "learning_rate=5e-3", "--set", "fp_learning_rate=2e-3"]
    assert build_config(p.parse_args(base)).learning_rate == 5e-3
    assert build_config(p.parse_args(base + ["--quant", "none"])).learning_rate == 2e-3
    same = build_config(p.parse_args(base[:-2] + ["--set", "fp_learning_rate=0", "--quant", "none"]))
    assert same.learning_rate == 5e-3  # 0 = the ternary rate
