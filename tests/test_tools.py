"""The command-line tools and the twin run, end to end on tiny trained checkpoints:
`python -m bitnet.generate`, `python -m bitnet.evaluate` (--arithmetic and --text),
`train_bitnet_arithmetic.py --twin` with its verdict files, and their one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bitnet.arithmetic_problems import solve
from bitnet.data_arithmetic import ArithmeticTask
from bitnet.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARITH = ["--set", "hidden_size=64", "--set", "intermediate_size=128", "--set", "num_hidden_layers=1",
              "--set", "num_attention_heads=4", "--set", "num_key_value_heads=4", "--set", "batch_size=32",
              "--set", "operators=*", "--set", "operator_weights=", "--set", "mul_max=5", "--set", "compile=false",
              "--set", "warmup_steps=10", "--set", "eval_problems=30", "--set", "learning_rate=5e-3"]


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300, **kw)


def trained_run(cfg, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("arith_run"))
    task = ArithmeticTask(cfg)
    result = train(cfg, task, out, device="cpu", quiet=True)
    return out, task, result["model"].eval()


@pytest.fixture(scope="module")
def arith_run(arith_cfg, tmp_path_factory):
    return trained_run(arith_cfg(quant="ternary", max_steps=150), tmp_path_factory)


@pytest.fixture(scope="module")
def reversed_run(arith_cfg, tmp_path_factory):
    # the run writes '1 * 2 = 20' (answers 2 digits wide, reversed); the tools show '1 * 2 = 2'
    return trained_run(arith_cfg(quant="ternary", max_steps=150, pad_numbers=True, reverse_answers=True),
                       tmp_path_factory)


@pytest.mark.parametrize("which", ["arith_run", "reversed_run"])
def test_generate_prints_the_greedy_completion(which, request):
    out, task, model = request.getfixturevalue(which)
    proc = run(["-m", "bitnet.generate", "--checkpoint", out, "--prompt", "1 * 2 ="])
    raw = run(["-m", "bitnet.generate", "--checkpoint", out, "--prompt", "1 * 2 =", "--raw"])
    assert proc.returncode == 0 and raw.returncode == 0, proc.stderr + raw.stderr
    prompt = task.domain.prompt(1, "*", 2)
    written = task.greedy(model, prompt, "cpu").strip()  # what the model writes: '20' for the padded, reversed run
    assert raw.stdout.strip() == f"{prompt} {written}"
    assert written == task.domain.written_answer(1, "*", 2)  # it learned the 0-5 table
    answer = int(written[::-1] if task.domain.reverse_answers else written)
    assert proc.stdout.strip() == f"1 * 2 = {answer}"


@pytest.mark.parametrize("which", ["arith_run", "reversed_run"])
def test_evaluate_arithmetic_matches_in_process_greedy_decoding(which, request, tmp_path):
    out, task, model = request.getfixturevalue(which)
    problems = [(a, "*", b) for a in range(6) for b in range(6)]
    path = tmp_path / "problems.txt"
    path.write_text("".join(f"{a} {op} {b} = {solve(a, op, b)}\n" for a, op, b in problems) + "\n")
    proc = run(["-m", "bitnet.evaluate", "--checkpoint", out, "--arithmetic", str(path)])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    hits = [task.complete(model, task.domain.prompt(a, op, b), "cpu").strip() == task.domain.answer(a, op, b)
            for a, op, b in problems]
    assert result["n"] == len(problems)
    assert result["accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert result["per_op"]["*"] == pytest.approx(sum(hits) / len(hits))
    assert result["per_op"]["+"] is None and result["accuracy"] > 0.5  # it learned the 0-5 table


def test_evaluate_shows_wrong_answers_as_a_person_writes_them(reversed_run, tmp_path):
    out, task, model = reversed_run
    path = tmp_path / "problems.txt"
    path.write_text("1 * 2 = 3\n2 * 2 = 4\n")  # the first expected answer is wrong: the model must miss it
    written = task.greedy(model, task.domain.prompt(1, "*", 2), "cpu").strip()
    assert written == "20"  # '02' reversed: what the padded, reversed run writes for 1 * 2
    shown = run(["-m", "bitnet.evaluate", "--checkpoint", out, "--arithmetic", str(path)])
    raw = run(["-m", "bitnet.evaluate", "--checkpoint", out, "--arithmetic", str(path), "--raw"])
    assert shown.returncode == 0 and raw.returncode == 0, shown.stderr + raw.stderr
    assert "  wrong: 1 * 2 = 2  (want 3)" in shown.stdout.splitlines()
    assert "  wrong: 1 * 2 = 20  (want 30)" in raw.stdout.splitlines()  # the model's own form: '02' and '03' reversed
    assert json.loads(shown.stdout.splitlines()[-1]) == json.loads(raw.stdout.splitlines()[-1])


@pytest.mark.parametrize("line, needle", [("12 plus 7 = 19", "expected a problem like"),
                                          ("12 + 7 = ?", "expected a problem like")])
def test_evaluate_arithmetic_bad_line_is_one_line_error(arith_run, tmp_path, line, needle):
    out, _, _ = arith_run
    path = tmp_path / "problems.txt"
    path.write_text(f"1 * 2 = 2\n{line}\n")
    proc = run(["-m", "bitnet.evaluate", "--checkpoint", out, "--arithmetic", str(path)])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr and "problems.txt:2" in proc.stderr


def test_tools_on_a_missing_checkpoint_are_one_line_errors(tmp_path):
    for tool in (["-m", "bitnet.generate", "--prompt", "1 + 1 ="], ["-m", "bitnet.evaluate", "--text", "x.txt"],
                 ["-m", "bitnet.diagnose"]):
        proc = run([*tool, "--checkpoint", str(tmp_path / "nope")])
        assert proc.returncode == 2 and proc.stderr.startswith("error: no checkpoint at")
        assert proc.stderr.count("\n") == 1


def test_evaluate_text_on_a_tinystories_run(tmp_path):
    data = os.path.join(os.path.dirname(REPO), "shared", "data", "tinystories")
    if not os.path.exists(os.path.join(data, "valid.txt")):
        pytest.skip(f"no TinyStories text at {data}")
    from bitnet.config_tiny import BitNetConfigTinyCPU
    from bitnet.text_tokenizer import save_tokenizer, train_bpe
    from bitnet.data_tinystories import TinyStoriesTask, iter_stories, text_metrics

    text = open(os.path.join(data, "valid.txt"), encoding="utf-8").read()
    sample = text[: text.index("<|endoftext|>", 40_000) + len("<|endoftext|>\n")]
    (tmp_path / "valid.txt").write_text(sample, encoding="utf-8")
    save_tokenizer(train_bpe(iter_stories(str(tmp_path / "valid.txt")), 512, show_progress=False), str(tmp_path / "tok"))
    cfg = BitNetConfigTinyCPU().with_overrides(
        ["vocab_size=512", "hidden_size=32", "intermediate_size=64", "num_hidden_layers=1", "num_attention_heads=2",
         "num_key_value_heads=2", "max_position_embeddings=32", "batch_size=4", "max_steps=3", "eval_interval=3",
         "eval_tokens=256", "sample_tokens=4", "compile=false"])
    task = TinyStoriesTask(cfg, str(tmp_path / "tok"), str(tmp_path / "valid.txt"), str(tmp_path / "valid.txt"),
                           str(tmp_path / "cache"))
    result = train(cfg, task, str(tmp_path / "run"), device="cpu", quiet=True)
    proc = run(["-m", "bitnet.evaluate", "--checkpoint", str(tmp_path / "run"), "--text", str(tmp_path / "valid.txt"),
                "--max-tokens", "300"])
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = text_metrics(result["model"].eval(), task.tok, sample, "cpu", max_tokens=300)
    assert got["n_tokens"] == want["n_tokens"] and 0 < got["n_tokens"] <= 300  # whole 32-token windows
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-5)
    gen = run(["-m", "bitnet.generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "Once upon a time",
               "--max-new-tokens", "5"])
    assert gen.returncode == 0 and gen.stdout.startswith("Once upon a time"), gen.stderr
    wrong = run(["-m", "bitnet.evaluate", "--checkpoint", str(tmp_path / "run"), "--arithmetic", "x.txt"])
    assert wrong.returncode == 2 and "is a tinystories run" in wrong.stderr


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory):
    """The launcher's twin run, once for the tests below: (its OUT, the launcher's process)."""
    out = tmp_path_factory.mktemp("twin") / "twin"
    proc = run(["train_bitnet_arithmetic.py", "--twin", "--out-dir", str(out), "--max-steps", "120",
                "--set", "eval_interval=60", *TINY_ARITH])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_twin_run_writes_both_runs_a_comparison_and_a_verdict(twin_run):
    out, proc = twin_run
    summary = json.loads((out / "summary.json").read_text())
    verdict = json.loads((out / "verdict.json").read_text())
    assert summary["ternary"]["quant"] == "ternary" and summary["fp"]["quant"] == "none"
    assert summary["ternary"]["steps"] == summary["fp"]["steps"] == 120
    assert summary["comparison"]["gap_nats"] == pytest.approx(
        summary["ternary"]["final"]["val_loss"] - summary["fp"]["final"]["val_loss"])
    assert verdict["verdict"] in ("OK", "BROKEN", "INCONCLUSIVE") and summary["verdict"] == verdict["verdict"]
    assert not [p for p, ok in verdict["evidence"]["probes"].items() if not ok]
    for name in ("loss_curves.png", "ternary_fractions.png", "ternary/ckpt.pt", "fp/ckpt.pt", "fp/train.log"):
        assert (out / name).exists(), name
    assert "ternary vs full-precision twin" in proc.stdout and "verdict:" in proc.stdout


def test_injected_bug_ends_broken_naming_it(tmp_path):
    out = tmp_path / "bug"
    proc = run(["train_bitnet_arithmetic.py", "--out-dir", str(out), "--max-steps", "20", "--inject-bug",
                "per_tensor_act", "--set", "eval_interval=20", *TINY_ARITH])
    assert proc.returncode == 1, proc.stderr[-2000:]  # BROKEN exits 1 (here before training: tests/test_fail_fast.py)
    verdict = json.loads((out / "verdict.json").read_text())
    from bitnet.bugs import get_bug
    # the verdict names the fault as the probes call it (README, "Check your own layer")
    assert verdict["verdict"] == "BROKEN" and verdict["suspected_bugs"] == [get_bug("per_tensor_act").problem]
    assert get_bug("per_tensor_act").problem == "per_tensor_act_scale"
    assert "INFRASTRUCTURE BROKEN" in proc.stdout


def test_preset_is_chosen_by_device_unless_given():
    from bitnet.cli import choose_preset, common_parser
    from bitnet.errors import TrainingError

    p = common_parser("t", gpu_preset="tiny", cpu_preset="tiny-cpu")
    given = p.parse_args(["--out-dir", "x", "--preset", "small"])
    assert choose_preset(given) is False and given.preset == "small"
    chosen = p.parse_args(["--out-dir", "x", "--device", "cpu"])
    assert choose_preset(chosen) is True and chosen.preset == "tiny-cpu"
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no CUDA GPU is visible"):
            choose_preset(p.parse_args(["--out-dir", "x", "--device", "cuda"]))


def test_tools_accept_a_twin_runs_out_dir(twin_run, tmp_path):
    from argparse import Namespace

    from bitnet.evaluate import evaluate_run
    out, _ = twin_run
    problems = tmp_path / "problems.txt"
    problems.write_text("".join(f"{a} * {b} = {a * b}\n" for a in range(6) for b in range(6)))
    ev = run(["-m", "bitnet.evaluate", "--checkpoint", str(out), "--arithmetic", str(problems)])
    assert ev.returncode == 0, ev.stderr
    both = json.loads(ev.stdout.strip().splitlines()[-1])
    alone = {name: evaluate_run(str(out / name), Namespace(checkpoint=str(out / name), arithmetic=str(problems),
                                                           text=None, device="cpu", kernel="auto"))
             for name in ("ternary", "fp")}  # each run's own folder, scored in this process
    assert {k: v for k, v in both.items() if k != "fp"} == alone["ternary"] and both["fp"] == alone["fp"]
    assert "ternary" in ev.stdout and "fp twin" in ev.stdout  # the side-by-side table
    gen = run(["-m", "bitnet.generate", "--checkpoint", str(out), "--prompt", "3 * 4 ="])
    assert gen.returncode == 0, gen.stderr
    lines = gen.stdout.strip().splitlines()
    assert [ln.split("]")[0] for ln in lines] == ["[ternary", "[fp twin"] and all("3 * 4 =" in ln for ln in lines)


def test_device_cuda_without_cuda_is_a_one_line_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run(["train_bitnet_arithmetic.py", "--out-dir", str(tmp_path / "x"), "--device", "cuda", *TINY_ARITH])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no CUDA GPU is visible" in proc.stderr
    assert not (tmp_path / "x").exists() or not os.listdir(tmp_path / "x")


def test_time_budget_flag_reaches_the_config():
    from bitnet.cli import build_config, common_parser
    p = common_parser("t", gpu_preset="arithmetic", cpu_preset="arithmetic-cpu")
    cfg = build_config(p.parse_args(["--out-dir", "x", "--preset", "arithmetic-cpu", "--time-budget", "2m"]))
    assert cfg.time_budget_s == 120
    preset = build_config(p.parse_args(["--out-dir", "x", "--preset", "arithmetic-cpu"]))
    assert preset.time_budget_s > 0 and preset.stop_when_solved  # the CPU preset plans itself
    steps = build_config(p.parse_args(["--out-dir", "x", "--preset", "arithmetic-cpu", "--max-steps", "50"]))
    assert steps.max_steps == 50 and steps.time_budget_s == 0  # explicit steps switch the budget off
    bad = run(["train_bitnet_arithmetic.py", "--out-dir", "x", "--time-budget", "soon"])
    assert bad.returncode == 2 and "duration like 9m" in bad.stderr
