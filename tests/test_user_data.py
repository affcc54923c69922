"""`train_bitnet_tiny.py --data SPEC`: the same tiny model trained on a user's loader
(tests/fixtures/data_loaders.py, written the ways published training code writes them) and on our
batches, scored on our held-out text. A faulty loader is named under part "data" with its cause;
a correct one is not BROKEN; bad input is one line, exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import story_corpus

from bitnet.text_tokenizer import save_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[1]
LOADERS = str(ROOT / "tests" / "fixtures" / "data_loaders.py")
TINY = ["--preset", "tiny-cpu", "--set", "hidden_size=48", "--set", "intermediate_size=96",
        "--set", "num_hidden_layers=1", "--set", "num_attention_heads=4", "--set", "num_key_value_heads=4",
        "--set", "compile=false", "--set", "dtype=fp32", "--set", "vocab_size=512",
        "--set", "max_position_embeddings=64", "--set", "batch_size=16", "--set", "warmup_steps=10",
        "--set", "eval_tokens=2048", "--set", "sample_tokens=8", "--set", "eval_interval=40", "--set", "learning_rate=1e-2", "--quiet"]  # a rate at which 80 steps learn


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Official-format train/valid text from the shared TinyStories and a 512-token tokenizer trained on it."""
    out = tmp_path_factory.mktemp("corpus")
    train, _ = story_corpus(out, 800_000, 800, 100_000, 100)
    save_tokenizer(train_bpe(train, vocab_size=512, show_progress=False), str(out / "tok"))
    return out


def their_tokenizer(path, vocab_size, special_tokens):
    """A byte-level BPE made elsewhere: its own special tokens first, so its ids are not ours."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(path)], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def train(corpus, out, loader, steps=80, extra=(), tokenizer=None):
    """--data LOADER with its ids from `tokenizer` (a tokenizer.json; default ours)."""
    kwargs = json.dumps({"tokenizer": str(tokenizer or corpus / "tok" / "tokenizer.json"),
                         "text": str(corpus / "train.txt"), "batch_size": 16})
    cmd = [sys.executable, str(ROOT / "train_bitnet_tiny.py"), "--out-dir", str(out), *TINY,
           "--max-steps", str(steps), "--data-dir", str(corpus), "--tokenizer", str(corpus / "tok"),
           "--cache-dir", str(corpus / "cache"), "--data", f"{LOADERS}:{loader}", "--data-kwargs", kwargs, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def data_faults(verdict: dict) -> dict:
    return {f["problem"]: f for f in verdict["faults"] if f["part"] == "data"}


def test_unshifted_labels_train_worse_and_are_named_with_their_cause(corpus, tmp_path):
    """nanoGPT's get_batch with y = x: the model learns to copy its input, so on held-out text it
    scores far worse than the same model on our batches; check_data's cause comes with it.
    (Without --train-anyway the check before training names it and stops: tests/test_fail_fast.py.)"""
    proc = train(corpus, tmp_path / "run", "nanogpt_unshifted", extra=["--train-anyway"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    verdict = json.loads((tmp_path / "run" / "verdict.json").read_text())
    assert verdict["verdict"] == "BROKEN", verdict["evidence"]["reason"]
    faults = data_faults(verdict)
    assert "user_data_trains_worse" in faults, verdict["faults"]
    comparison = verdict["evidence"]["data"]["comparison"]
    assert comparison["yours_bpb"] - comparison["ours_bpb"] > 0.1
    causes = verdict["evidence"]["data"]["check_data_problems"]
    assert "unshifted_labels" in causes and set(causes) <= set(faults)  # named with its cause, not only "worse"
    assert all(verdict["evidence"]["probes"].values())  # the layer is not blamed
    assert "check_data names " + causes[0] in faults["user_data_trains_worse"]["evidence"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary) >= {"ours", "yours", "comparison", "data_checks"}


def test_a_correct_loader_is_not_broken_and_its_checkpoint_works_in_the_tools(corpus, tmp_path):
    proc = train(corpus, tmp_path / "run", "nanogpt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = json.loads((tmp_path / "run" / "verdict.json").read_text())
    assert verdict["verdict"] != "BROKEN", verdict["evidence"]["reason"]
    assert not data_faults(verdict) and not verdict["evidence"]["data"]["check_data_problems"]
    assert verdict["evidence"]["data"]["comparison"]["judged"]
    from bitnet.checkpoint import load_checkpoint
    from bitnet.tasks import codec_for
    identity = load_checkpoint(str(tmp_path / "run" / "yours"))["task"]
    assert identity["task"] == "tinystories-user-data" and identity["data"].endswith("data_loaders.py:nanogpt")
    assert codec_for(identity).decode(codec_for(identity).encode("Once upon a time")).endswith("Once upon a time")


def test_a_correct_loader_with_its_own_tokenizer_is_compared_in_bits_per_byte(corpus, tmp_path):
    """nanoGPT's get_batch over another tokenizer's ids (more tokens than ours, every id shifted):
    with --data-tokenizer the model of "yours" has that vocabulary, our held-out text is encoded with
    it and scored per byte, check_data reads the batches with it, and generate works on OUT/yours."""
    theirs = their_tokenizer(corpus / "train.txt", 640, ["<unk>", "<s>", "</s>", "<|endoftext|>"])
    theirs.save(str(tmp_path / "theirs.json"))
    out = tmp_path / "run"
    proc = train(corpus, out, "nanogpt", tokenizer=tmp_path / "theirs.json",
                 extra=["--data-tokenizer", str(tmp_path / "theirs.json")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"] != "BROKEN", verdict["evidence"]["reason"]
    assert not data_faults(verdict) and not verdict["evidence"]["data"]["check_data_problems"]
    comparison = verdict["evidence"]["data"]["comparison"]
    assert comparison["judged"] and not comparison["worse"], comparison["finding"]
    from bitnet.checkpoint import load_checkpoint
    ckpt = load_checkpoint(str(out / "yours"))
    from tokenizers import Tokenizer
    assert ckpt["config"]["vocab_size"] == theirs.get_vocab_size() > 512  # ids our model could not take
    assert Tokenizer.from_str(ckpt["task"]["tokenizer"]).get_vocab() == theirs.get_vocab()
    assert load_checkpoint(str(out / "ours"))["config"]["vocab_size"] == 512  # ours is unchanged
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    gen = subprocess.run([sys.executable, "-m", "bitnet.generate", "--checkpoint", str(out / "yours"),
                          "--prompt", "Once upon a time", "--max-new-tokens", "8"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert gen.returncode == 0 and gen.stdout.startswith("Once upon a time"), gen.stderr[-2000:]


def test_a_tokenizer_without_our_separator_gets_no_prefix_and_stops_at_its_eos(corpus):
    """The codec of OUT/yours when the user's tokenizer has no <|endoftext|>: nothing put first,
    generation stops at its own </s>."""
    from bitnet.tasks import codec_for
    theirs = their_tokenizer(corpus / "valid.txt", 300, ["<s>", "</s>"])
    codec = codec_for({"task": "tinystories-user-data", "tokenizer": theirs.to_str()})
    assert codec.prefix == () and codec.stop_id == theirs.token_to_id("</s>")
    assert codec.decode(codec.encode("Once upon a time")) == "Once upon a time"


def test_packing_without_separators_is_named_before_training(corpus, tmp_path):
    """A fault too mild to show in a short run is still named: check_data reads the first batches."""
    proc = train(corpus, tmp_path / "run", "packed_no_separator", steps=10)
    assert proc.returncode == 1, proc.stderr[-3000:]  # BROKEN exits 1
    verdict = json.loads((tmp_path / "run" / "verdict.json").read_text())
    assert verdict["verdict"] == "BROKEN" and "no_document_separator" in data_faults(verdict)


@pytest.mark.parametrize("flags, words", [
    (["--data", "no_such_module_xyz:batches"], "no_such_module_xyz"),
    (["--data-kwargs", "{oops"], "--data-kwargs"),
    (["--twin"], "drop --twin"),
    (["--data-tokenizer", "/no/such/tokenizer.json"], "--data-tokenizer /no/such/tokenizer.json"),
])
def test_bad_input_is_one_line_exit_2(corpus, tmp_path, flags, words):
    proc = train(corpus, tmp_path / "run", "nanogpt", steps=5, extra=flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_negative_ids_are_one_line_not_a_crash():
    """A loader that pads its inputs or marks ignored labels with -1 (not -100) would index the
    embedding out of range: get_batch says so in one line (a ValueError: exit 2)."""
    import types

    import numpy as np

    from bitnet.data_user import UserDataTask
    task = object.__new__(UserDataTask)  # only what get_batch reads: the rows, the spec, the vocabulary
    rows = {0: (np.array([5, 6, -1]), np.array([6, -1, -100])), 1: (np.array([1, 2, 3]), np.array([2, 3, 4]))}
    task.rows, task.spec = types.SimpleNamespace(row=rows.__getitem__), "loader.py:batches"
    task.cfg = types.SimpleNamespace(vocab_size=512)
    with pytest.raises(ValueError, match="ids must be >= 0 and ignored labels -100"):
        task.get_batch(0, 2)
    rows[0] = (np.array([5, 6, 7]), np.array([6, 7, -100]))
    x, y = task.get_batch(0, 2)
    assert x.shape == (2, 3) and int(y[0, 2]) == -100
