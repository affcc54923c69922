"""The bad-input matrix: every case exits with code 2 and ONE line on stderr that names the
problem and the fix, and leaves what was already in OUT_DIR byte for byte as it was.
A NaN/Inf loss exits 3 and keeps the last good checkpoint.

The tools run in this process (their `main` under cli.run_main, exactly as `python -m` runs
them), so a case costs milliseconds to a second instead of a fresh torch import."""
import hashlib
import os
import runpy
import shutil
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARITH = os.path.join(REPO, "train_bitnet_arithmetic.py")
TINY = os.path.join(REPO, "train_bitnet_tiny.py")
TINY_ARITH = ["--device", "cpu", "--quiet", "--threads", "1", "--preset", "arithmetic",
              "--set", "hidden_size=32", "--set", "intermediate_size=64", "--set", "num_hidden_layers=1",
              "--set", "num_attention_heads=4", "--set", "num_key_value_heads=4", "--set", "batch_size=8",
              "--set", "operators=*", "--set", "operator_weights=", "--set", "mul_max=5", "--set", "compile=false",
              "--set", "max_position_embeddings=12", "--set", "warmup_steps=2", "--set", "eval_problems=4",
              "--set", "dtype=fp32"]


def run_tool(capsys, tool: str, argv: list[str]) -> tuple[int, list[str]]:
    """Run a script path or a bitnet module's main() as its command line would; (exit code, stderr lines)."""
    from bitnet.errors import run_main

    capsys.readouterr()
    old_argv = sys.argv
    sys.argv = [tool, *argv]
    try:
        if tool.endswith(".py"):
            runpy.run_path(tool, run_name="__main__")
        else:
            module = __import__(f"bitnet.{tool}", fromlist=["main"])
            run_main(module.main) if tool != "diagnose" else module.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def snapshot(folder) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_refused(result, *needles, code=2):
    exit_code, lines = result
    assert exit_code == code, lines
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def arith_run(tmp_path_factory, capsys_module=None):
    """A finished tiny arithmetic run (8 steps, a checkpoint at 4 and 8) made by the real script."""
    out = str(tmp_path_factory.mktemp("arith") / "run")
    old = sys.argv
    sys.argv = [ARITH, "--out-dir", out, "--max-steps", "8", "--set", "eval_interval=4", "--no-verdict", *TINY_ARITH]
    try:
        runpy.run_path(ARITH, run_name="__main__")
    finally:
        sys.argv = old
    assert os.path.exists(os.path.join(out, "ckpt.prev.pt"))
    return out


@pytest.fixture
def run_dir(arith_run, tmp_path):
    """A private copy of the finished run, and its snapshot."""
    d = str(tmp_path / "run")
    shutil.copytree(arith_run, d)
    return d, snapshot(d)


# ---------------------------------------------------------------- bad --set values
@pytest.mark.parametrize("pair, problem, fix", [
    ("hidden_size=abc", "expected a value of type int", "--set hidden_size="),
    ("hiden_size=64", "has no field 'hiden_size'", "fields:"),
    ("batch_size=0", "batch_size must be >= 1, got 0", "--set batch_size="),
    ("batch_size=-4", "batch_size must be >= 1, got -4", "--set batch_size="),
    ("learning_rate=0", "learning_rate must be > 0", "--set learning_rate="),
    ("learning_rate=-1e-3", "learning_rate must be > 0", "--set learning_rate="),
    ("hidden_size=34", "hidden_size 34 must divide by num_attention_heads 4", "--set"),
    ("max_position_embeddings=6", "max_position_embeddings 6 is shorter than the longest problem",
     "--set max_position_embeddings=11"),  # "<bos>5 * 5 = 25\\n": 12 tokens, 11 inputs
])
@pytest.mark.parametrize("resume", [False, True])
def test_bad_set_value(capsys, run_dir, pair, problem, fix, resume):
    out, before = run_dir
    argv = ["--out-dir", out, *TINY_ARITH, "--set", pair] + (["--resume"] if resume else [])
    assert_refused(run_tool(capsys, ARITH, argv), problem, fix)
    assert snapshot(out) == before


# ---------------------------------------------------------------- checkpoints
def test_resume_without_a_checkpoint(capsys, tmp_path, run_dir):
    assert_refused(run_tool(capsys, ARITH, ["--out-dir", str(tmp_path / "new"), "--resume", *TINY_ARITH]),
                   "no checkpoint at", "start without --resume")
    out, before = run_dir  # a run folder whose ckpt.pt is gone: says so, and points at the previous one
    os.remove(os.path.join(out, "ckpt.pt"))
    before.pop("ckpt.pt")
    assert_refused(run_tool(capsys, ARITH, ["--out-dir", out, "--resume", *TINY_ARITH]),
                   "no checkpoint at", "ckpt.prev.pt exists", "--resume-from-previous")
    assert snapshot(out) == before


def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_truncated_checkpoint_names_the_previous_one_and_resume_from_it_works(capsys, run_dir):
    out, before = run_dir
    truncate(os.path.join(out, "ckpt.pt"))
    before = snapshot(out)
    argv = ["--out-dir", out, "--max-steps", "8", "--set", "eval_interval=4", "--no-verdict", *TINY_ARITH]
    assert_refused(run_tool(capsys, ARITH, [*argv, "--resume"]), "is not a readable checkpoint",
                   f"previous good checkpoint is {os.path.join(out, 'ckpt.prev.pt')}", "--resume-from-previous")
    for tool, extra in (("generate", ["--prompt", "2 * 3 ="]), ("evaluate", ["--arithmetic", "x.txt"]),
                        ("diagnose", [])):
        assert_refused(run_tool(capsys, tool, ["--checkpoint", out, *extra]), "is not a readable checkpoint",
                       "ckpt.prev.pt")
    assert snapshot(out) == before
    # asked to, it continues from the previous checkpoint (step 4) and ends where the run ended
    code, lines = run_tool(capsys, ARITH, [*argv, "--resume-from-previous"])
    assert code == 0, lines
    from bitnet.checkpoint import load_checkpoint
    assert load_checkpoint(out)["step"] == 8 and load_checkpoint(os.path.join(out, "ckpt.prev.pt"))["step"] == 4


def test_checkpoint_missing_or_truncated_for_the_tools(capsys, tmp_path, run_dir):
    out, before = run_dir
    for tool, extra in (("generate", ["--prompt", "2 * 3 ="]), ("evaluate", ["--arithmetic", "x.txt"]),
                        ("diagnose", [])):
        assert_refused(run_tool(capsys, tool, ["--checkpoint", str(tmp_path / "nope"), *extra]),
                       "no checkpoint at", "--out-dir")
        assert_refused(run_tool(capsys, tool, ["--checkpoint", os.path.join(out, "metrics.jsonl"), *extra]),
                       "metrics.jsonl was not loaded", "Unsupported operand", "is damaged")
    assert snapshot(out) == before


def test_checkpoint_from_another_config(capsys, run_dir):
    out, before = run_dir
    # resume with a different model: refused, naming the fields
    assert_refused(run_tool(capsys, ARITH, ["--out-dir", out, "--resume", *TINY_ARITH, "--set", "num_hidden_layers=2"]),
                   "config differs from the checkpoint's in ['num_hidden_layers']", "drop those overrides")
    assert snapshot(out) == before
    # a checkpoint whose weights do not fit its own config (edited, or another version)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    ckpt["config"]["hidden_size"] = 64
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    assert_refused(run_tool(capsys, "generate", ["--checkpoint", out, "--prompt", "2 * 3 ="]),
                   "weights do not fit its config", "retrain")


def test_checkpoint_from_another_tokenizer(capsys, run_dir, monkeypatch):
    out, before = run_dir
    from bitnet.arithmetic_codec import CharTokenizer
    monkeypatch.setattr(CharTokenizer, "identity", "arith-char32-v2")  # as if the vocabulary had changed
    assert_refused(run_tool(capsys, ARITH, ["--out-dir", out, "--resume", *TINY_ARITH]),
                   "different task/tokenizer (differs in ['tokenizer'])", "use a new --out-dir")
    assert_refused(run_tool(capsys, "generate", ["--checkpoint", out, "--prompt", "2 * 3 ="]),
                   "checkpoint tokenizer 'arith-char32-v1' is not this version's")
    assert snapshot(out) == before


def test_prompt_outside_the_vocabulary(capsys, run_dir):
    out, before = run_dir
    assert_refused(run_tool(capsys, "generate", ["--checkpoint", out, "--prompt", "2 x 3 ="]),
                   "characters ['x'] are not in the arithmetic vocabulary")
    assert snapshot(out) == before


# ---------------------------------------------------------------- OUT_DIR itself
def test_unwritable_out_dir(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_refused(run_tool(capsys, ARITH, ["--out-dir", str(blocker / "run"), *TINY_ARITH]),
                   "cannot write to --out-dir", "choose a folder you can write to")
    assert blocker.read_text() == "not a folder"
    if os.geteuid() != 0:  # root writes anywhere, so only a non-root user can see this case
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        assert_refused(run_tool(capsys, ARITH, ["--out-dir", str(locked), *TINY_ARITH]), "cannot write to --out-dir")


def test_full_disk_during_a_save(capsys, run_dir, monkeypatch):
    out, before = run_dir

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the start of a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    argv = ["--out-dir", out, "--resume", "--max-steps", "12", "--set", "eval_interval=4", "--no-verdict", *TINY_ARITH]
    assert_refused(run_tool(capsys, ARITH, argv), "disk full: could not write the checkpoint",
                   "free some space", "still holds the last good checkpoint", code=4)  # more in test_disk_full.py
    assert snapshot(out) == before  # checkpoints, metrics.jsonl (rolled back to the checkpoint), summary


def test_non_finite_loss_exits_3_and_keeps_the_last_good_checkpoint(capsys, tmp_path, monkeypatch):
    from bitnet.model import BitNetForCausalLM

    real, training_calls = BitNetForCausalLM.forward, []

    def poisoned(self, *args, **kwargs):  # the loss turns NaN at training step 6 (steps count from 0)
        logits, loss = real(self, *args, **kwargs)
        if self.training and loss is not None:
            training_calls.append(1)
            if len(training_calls) > 6:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(BitNetForCausalLM, "forward", poisoned)
    out = str(tmp_path / "run")
    result = run_tool(capsys, ARITH, ["--out-dir", out, "--max-steps", "20", "--set", "eval_interval=4",
                                      "--set", "operators=*", *TINY_ARITH])
    assert_refused(result, "loss became nan at step 6", "stopped before the update",
                   f"last good checkpoint kept: {os.path.join(out, 'ckpt.pt')}", "learning_rate", code=3)
    from bitnet.checkpoint import load_checkpoint
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


# The children of a twin run are separate processes, so the fault reaches them the way code of
# one's own would: a sitecustomize on their PYTHONPATH (nothing in the library is switched).
NAN_IN_TERNARY_CHILD = """
from bitnet.model import BitNetForCausalLM
real, steps = BitNetForCausalLM.forward, []
def forward(self, *args, **kwargs):  # the ternary model's loss turns NaN at its 13th training step
    logits, loss = real(self, *args, **kwargs)
    if self.training and loss is not None and self.config.quant == "ternary":
        steps.append(1)
        if len(steps) > 12:
            loss = loss * float("nan")
    return logits, loss
BitNetForCausalLM.forward = forward
"""


def test_a_twin_child_dying_of_nan_stops_the_other_and_the_parent_exits_3(capsys, tmp_path, monkeypatch):
    import time

    from bitnet.checkpoint import load_checkpoint

    (tmp_path / "poison").mkdir()
    (tmp_path / "poison" / "sitecustomize.py").write_text(NAN_IN_TERNARY_CHILD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "poison"), os.environ.get("PYTHONPATH", "")]))
    out = str(tmp_path / "run")
    t0 = time.time()
    # 100,000 steps: the fp twin alone would train for minutes; it must be stopped within seconds
    code, lines = run_tool(capsys, ARITH, ["--twin", "--out-dir", out, "--max-steps", "100000",
                                           "--set", "eval_interval=5", *TINY_ARITH])
    assert code == 3, lines
    # the ternary child's own error, live (its stderr is echoed), then the parent's one line
    assert any("loss became nan at step 12" in ln for ln in lines[:-1]), lines
    assert lines[-1].startswith("error: twin run failed") and not any(ln.startswith("Traceback") for ln in lines)
    assert f"ternary (exit 3, see {os.path.join(out, 'ternary', 'train.log')})" in lines[-1], lines
    assert f"fp (exit 143, see {os.path.join(out, 'fp', 'train.log')})" in lines[-1], lines  # stopped by the parent
    assert time.time() - t0 < 120
    ternary_log = open(os.path.join(out, "ternary", "train.log")).read()
    assert "loss became nan at step 12" in ternary_log, ternary_log[-2000:]  # the log the line names holds it
    fp = load_checkpoint(os.path.join(out, "fp"))  # SIGTERM: the twin saved where it stopped
    assert 12 <= fp["step"] < 100000
    assert load_checkpoint(os.path.join(out, "ternary"))["step"] == 10  # the last good one, kept


# ---------------------------------------------------------------- TinyStories data and tokenizer
WORDS = ("cat dog sun tree ball red big small happy sad ran jumped saw played with the a and was "
         "Tom Lily Ben park home mom friend little bird fish blue green").split()


@pytest.fixture(scope="module")
def stories_run(tmp_path_factory):
    """A tiny finished TinyStories run on made-up stories, with its own 300-token tokenizer."""
    import random

    from bitnet.text_tokenizer import save_tokenizer, train_bpe
    from bitnet.data_tinystories import iter_stories

    root = tmp_path_factory.mktemp("stories")
    rng = random.Random(0)
    text = "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) + ".\n<|endoftext|>\n"
                   for _ in range(300))
    (root / "train.txt").write_text(text, encoding="utf-8")
    for name, size in (("tok", 300), ("tok_other", 280)):
        save_tokenizer(train_bpe(iter_stories(str(root / "train.txt")), size, show_progress=False), str(root / name))
    out = str(root / "run")
    argv = stories_argv(root, out) + ["--no-verdict"]
    old = sys.argv
    sys.argv = [TINY, *argv]
    try:
        runpy.run_path(TINY, run_name="__main__")
    finally:
        sys.argv = old
    return root, out


def stories_argv(root, out, train=None, tokenizer=None) -> list[str]:
    train = str(train or root / "train.txt")
    return ["--out-dir", out, "--device", "cpu", "--quiet", "--preset", "tiny-cpu", "--train-file", train,
            "--val-file", str(root / "train.txt"), "--tokenizer", str(tokenizer or root / "tok"),
            "--max-steps", "2", "--set", "vocab_size=300", "--set", "hidden_size=32", "--set", "intermediate_size=64",
            "--set", "num_hidden_layers=1", "--set", "num_attention_heads=2", "--set", "num_key_value_heads=2",
            "--set", "max_position_embeddings=16", "--set", "batch_size=2", "--set", "eval_interval=2",
            "--set", "eval_tokens=64", "--set", "sample_tokens=4", "--set", "compile=false"]


@pytest.fixture
def stories_dir(stories_run, tmp_path):
    root, out = stories_run
    d = str(tmp_path / "run")
    shutil.copytree(out, d)
    return root, d, snapshot(d)


@pytest.mark.parametrize("content, problem", [
    (None, "does not exist"),
    (b"", "holds no stories (is it empty?)"),
    (b"Once upon a time \xff\xfe there was a cat.\n<|endoftext|>\n", "is not UTF-8 text: byte 0xff at byte offset 17"),
    (bytes(range(256)) * 4, "looks like a binary file (a NUL byte at byte offset 0)"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "looks like a binary file (a NUL byte at byte offset 8)"),
])
def test_bad_data_file(capsys, stories_dir, content, problem):
    root, out, before = stories_dir
    bad = os.path.join(os.path.dirname(out), "bad.txt")
    if content is not None:
        with open(bad, "wb") as f:
            f.write(content)
    assert_refused(run_tool(capsys, TINY, stories_argv(root, out, train=bad)), bad, problem)
    assert snapshot(out) == before


def test_tokenizer_missing_or_too_big_for_the_config(capsys, stories_dir, tmp_path):
    root, out, before = stories_dir
    assert_refused(run_tool(capsys, TINY, stories_argv(root, out, tokenizer=tmp_path / "none")),
                   "no tokenizer.json in", "train_tinystories_tokenizer.py")
    assert_refused(run_tool(capsys, TINY, stories_argv(root, out) + ["--set", "vocab_size=200"]),
                   "has 300 tokens but vocab_size is 200", "--set vocab_size=300")
    assert snapshot(out) == before


def test_resume_with_another_tokenizer(capsys, stories_dir):
    root, out, before = stories_dir
    result = run_tool(capsys, TINY, stories_argv(root, out, tokenizer=root / "tok_other") + ["--resume"])
    assert_refused(result, "different task/tokenizer (differs in ['tokenizer'])", "the original data and tokenizer")
    after = snapshot(out)  # the other tokenizer's token cache may be added; nothing that was there changes
    assert {k: after.get(k) for k in before} == before
    assert not [k for k in set(after) - set(before) if not k.startswith("cache" + os.sep)]


# ---------------------------------------------------------------- a checkpoint never runs code
class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_is_refused_and_never_runs(capsys, tmp_path, run_dir):
    import pickle

    out, _ = run_dir
    marker = tmp_path / "pwned"
    # the test can fail: the same file *does* run its payload when unpickled without weights_only
    probe = tmp_path / "probe.pt"
    torch.save({"model": {}, "config": {}, "x": Payload(tmp_path / "probe_ran")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe_ran").exists()

    zipped = lambda path: torch.save({"model": {}, "config": {}, "step": 1, "x": Payload(marker)}, path)  # noqa: E731
    raw = lambda path: open(path, "wb").write(pickle.dumps({"model": {}, "config": {}, "x": Payload(marker)}))  # noqa: E731
    for write in (zipped, raw):
        write(os.path.join(out, "ckpt.pt"))
        before = snapshot(out)
        refusals = {
            "generate": run_tool(capsys, "generate", ["--checkpoint", out, "--prompt", "2 * 3 ="]),
            "evaluate": run_tool(capsys, "evaluate", ["--checkpoint", out, "--arithmetic", "x.txt"]),
            "diagnose": run_tool(capsys, "diagnose", ["--checkpoint", out]),
            "resume": run_tool(capsys, ARITH, ["--out-dir", out, "--resume", *TINY_ARITH]),
        }
        for name, result in refusals.items():
            assert_refused(result, "ckpt.pt was not loaded: weights_only refused it", "whose unpickling could run code",
                           "use a checkpoint written by bitnet-tiny")
            assert "posix.system" in result[1][0] or write is raw, result  # it names what it refused
        assert not marker.exists(), "the payload ran"
        assert snapshot(out) == before


# ---------------------------------------------------------------- one writer per OUT_DIR
def test_a_second_run_on_an_out_dir_in_use_is_refused(capsys, run_dir):
    from bitnet.rundir import out_dir_lock

    out, before = run_dir
    with out_dir_lock(out):  # another run holds it (a second open file holds its own flock)
        assert_refused(run_tool(capsys, ARITH, ["--out-dir", out, "--resume", *TINY_ARITH]),
                       f"{out} is in use by another run (pid {os.getpid()}", "use another --out-dir")
    assert snapshot(out) == before  # and the lock file is gone again


def test_a_stale_lock_is_taken_over(capsys, run_dir):
    import subprocess

    out, _ = run_dir
    gone = subprocess.Popen(["true"])
    gone.wait()
    with open(os.path.join(out, "run.lock"), "w") as f:  # left by a killed run: no process holds it
        f.write(f"{gone.pid}\n")
    open(os.path.join(out, f"ckpt.pt.tmp.{gone.pid}"), "wb").write(b"half a checkpoint")
    code, lines = run_tool(capsys, ARITH, ["--out-dir", out, "--resume", "--max-steps", "10", "--no-verdict",
                                           "--set", "eval_interval=4", *TINY_ARITH])
    assert code == 0, lines
    assert not os.path.exists(os.path.join(out, "run.lock"))
    assert not [n for n in os.listdir(out) if ".tmp." in n]  # the dead run's temporary file is cleaned up


# ---------------------------------------------------------------- SIGTERM / SIGINT
@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_sigterm_and_sigint_save_and_exit_cleanly(capsys, tmp_path, monkeypatch, sig, code):
    """The signal arrives (from this process, deterministically) while step 5 is being trained: the run
    finishes that step, saves step 6, exits 128 + signum with a one-line message, and resumes from there."""
    import signal

    from bitnet.data_arithmetic import ArithmeticTask
    from bitnet.checkpoint import load_checkpoint

    real = ArithmeticTask.get_batch

    def get_batch(self, step, batch_size):
        if step == 5:
            os.kill(os.getpid(), getattr(signal, sig))
        return real(self, step, batch_size)

    monkeypatch.setattr(ArithmeticTask, "get_batch", get_batch)
    out = str(tmp_path / "run")
    argv = ["--out-dir", out, "--max-steps", "1000", "--set", "eval_interval=1000", "--no-verdict", *TINY_ARITH]
    exit_code, lines = run_tool(capsys, ARITH, argv)
    assert exit_code == code, lines
    assert lines == [f"{sig}: saving a checkpoint after this step, then stopping",
                     f"stopped: stopped by {sig} at step 6; saved {os.path.join(out, 'ckpt.pt')}; continue with --resume"]
    assert load_checkpoint(out)["step"] == 6 and not os.path.exists(os.path.join(out, "run.lock"))
    assert signal.getsignal(getattr(signal, sig)) in (signal.SIG_DFL, signal.default_int_handler)  # restored
    monkeypatch.undo()
    code, lines = run_tool(capsys, ARITH, ["--out-dir", out, "--resume", "--max-steps", "9", "--no-verdict",
                                           "--set", "eval_interval=1000", *TINY_ARITH])
    assert code == 0 and load_checkpoint(out)["step"] == 9, lines


# ---------------------------------------------------------------- exact resume from a time-based checkpoint
def test_resume_between_evaluations_is_bit_identical(arith_cfg, tmp_path):
    """Checkpoints every step (checkpoint_interval_s=0), a crash between evaluations, dropout on (the
    RNG state matters) and the quantization-health hook (its flip-rate baseline must be restored):
    the resumed run ends bit for bit where the uninterrupted one does, summary numbers included."""
    from bitnet.data_arithmetic import ArithmeticTask
    from bitnet.diagnose import QuantHealthTracker
    from bitnet.checkpoint import load_checkpoint
    from bitnet.trainer import train

    class Crash(Exception):
        pass

    class CrashingTask(ArithmeticTask):
        def get_batch(self, step, batch_size):
            if step == 17:
                raise Crash
            return super().get_batch(step, batch_size)

    cfg = arith_cfg(max_steps=24, eval_interval=12, warmup_steps=5, eval_problems=8, dropout=0.1,
                    checkpoint_interval_s=0.0)
    hook = lambda task: QuantHealthTracker(lambda: task.get_batch(0, 8))  # noqa: E731
    task = ArithmeticTask(cfg)
    full = train(cfg, task, str(tmp_path / "full"), device="cpu", quiet=True, on_eval=hook(task))
    run = str(tmp_path / "crashed")
    crashing = CrashingTask(cfg)
    with pytest.raises(Crash):
        train(cfg, crashing, run, device="cpu", quiet=True, on_eval=hook(crashing))
    assert load_checkpoint(run)["step"] == 17 and load_checkpoint(os.path.join(run, "ckpt.prev.pt"))["step"] == 16
    task = ArithmeticTask(cfg)
    resumed = train(cfg, task, run, device="cpu", resume=True, quiet=True, on_eval=hook(task))
    for key in ("history", "first_train_loss", "last_train_loss"):
        assert resumed[key] == full[key], key
    a, b = load_checkpoint(run), load_checkpoint(str(tmp_path / "full"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["rng_state"], b["rng_state"]) and a["history"] == b["history"]
    assert a["history"][-1]["qh_flip_rate"] is not None  # the restored baseline was used
