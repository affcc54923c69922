"""python -m bitnet.check_model on our own small runs (OK) and on the faults real inference code
makes (tests/fixtures/user_inference.py): each BROKEN, naming its problem and part, exit 1."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from bitnet.check_model import main
from bitnet.diagnose.problems import PROBLEMS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "user_inference.py")
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "tinystories", "valid.txt")
EOT = "<|endoftext|>"


def check(argv, capsys) -> tuple[int, dict, str]:
    code = main(argv)
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1]), out


@pytest.fixture(scope="module")
def world(tmp_path_factory, arith_cfg):
    """Held-out and training text, a tokenizer with a <s> the stream never uses, our TinyStories run
    (dropout 0.1) and its exports, the user's TinyTernaryLM, an arithmetic twin run (OUT/ternary +
    OUT/fp) and an arithmetic run with coupled weight decay."""
    if not os.path.exists(DATA):
        pytest.skip(f"no TinyStories text at {DATA}")
    from bitnet.config_tiny import BitNetConfigTinyCPU
    from bitnet.data_arithmetic import ArithmeticTask
    from bitnet.text_tokenizer import save_tokenizer, train_bpe
    from bitnet.data_tinystories import TinyStoriesTask, split_stories
    from bitnet.export import export
    from bitnet.trainer import train
    sys.path.insert(0, os.path.dirname(FIXTURE))
    import user_inference

    root = tmp_path_factory.mktemp("check_model")
    text = open(DATA, encoding="utf-8").read(120_000)
    cut = text.index(EOT, 80_000) + len(EOT) + 1
    (root / "train.txt").write_text(text[:cut], encoding="utf-8")
    (root / "heldout.txt").write_text(text[cut:text.rindex(EOT) + len(EOT)] + "\n", encoding="utf-8")
    tok = train_bpe(split_stories(text[:cut]), 512, show_progress=False)
    tok.add_special_tokens(["<s>"])  # a BOS the training stream never holds
    save_tokenizer(tok, str(root / "tok"))
    vocab = tok.get_vocab_size()
    cfg = BitNetConfigTinyCPU().with_overrides(
        [f"vocab_size={vocab}", "hidden_size=64", "intermediate_size=128", "num_hidden_layers=2",
         "num_attention_heads=4", "num_key_value_heads=4", "max_position_embeddings=64", "batch_size=8",
         "max_steps=30", "eval_interval=30", "eval_tokens=512", "sample_tokens=8", "compile=false",
         "dropout=0.1", "learning_rate=3e-3", "warmup_steps=5", "time_budget_s=0"])
    task = TinyStoriesTask(cfg, str(root / "tok"), str(root / "train.txt"), str(root / "heldout.txt"),
                           str(root / "cache"))
    train(cfg, task, str(root / "ts"), device="cpu", quiet=True)
    export(str(root / "ts"), str(root / "ts_packed"), packed=True)
    export(str(root / "ts"), str(root / "ts_online"))
    shutil.copytree(root / "ts_packed", root / "ts_inverted")
    user_inference.invert_packed_scales(str(root / "ts_inverted"))
    stream = [i for s in split_stories(text[:cut]) for i in (tok.token_to_id(EOT), *tok.encode(s).ids)]
    seen = user_inference.train_and_save(stream, vocab, str(root / "user"), steps=30)
    user_inference.whitespace_tokenizer(split_stories(text[:cut]), 400, str(root / "ws.json"))
    arith = {"twin/ternary": {}, "twin/fp": {"quant": "none"}, "coupled": {"inject_bug": "coupled_weight_decay"}}
    for out, kw in arith.items():
        acfg = arith_cfg(max_steps=100, weight_decay=0.1, compile=False, **kw)
        train(acfg, ArithmeticTask(acfg), str(root / out), device="cpu", quiet=True)
    return {"root": root, "seen": seen}


@pytest.fixture
def user_env(world, monkeypatch):
    root = world["root"]
    monkeypatch.setenv("CHECK_MODEL_USER_DIR", str(root / "user"))
    monkeypatch.setenv("CHECK_MODEL_RUN", str(root / "ts"))
    monkeypatch.setenv("CHECK_MODEL_TOKENIZER", str(root / "tok" / "tokenizer.json"))
    user = ["--model", f"{FIXTURE}:load_trained", "--tokenizer", str(root / "tok" / "tokenizer.json"),
            "--text", str(root / "heldout.txt"), "--tokens-seen", str(world["seen"])]
    return root, user


@pytest.mark.parametrize("which", ["ts", "ts_online", "ts_packed", "twin", "twin/fp"])
def test_our_runs_are_ok(world, which, capsys):
    root = world["root"]
    argv = ["--checkpoint", str(root / which)] + (["--text", str(root / "heldout.txt")] if "twin" not in which else [])
    code, result, out = check(argv, capsys)
    assert code == 0 and result["verdict"] == "OK", out
    assert result["diagnosis"] in ("ok", "capacity")
    if "twin" not in which:  # a text run is scored: its loss beats the unigram of the held-out text
        assert result["val_loss"] is not None and result["bits_per_byte"] > 0
        assert result["expected_loss"][0] < result["expected_loss"][1]


def test_a_users_model_with_its_own_cached_generate_is_ok(user_env, capsys):
    root, user = user_env
    code, result, out = check(user + ["--generate", f"{FIXTURE}:generate_with_cache"], capsys)
    assert code == 0 and result["verdict"] == "OK", out
    assert "generated tokens compared" in out and " 0 generated tokens" not in out


@pytest.mark.parametrize("extra, problem", [
    (["--generate", f"{FIXTURE}:generate_cache_off_by_one"], "generation_mismatch"),
    (["--generate", f"{FIXTURE}:generate_second_to_last"], "generation_mismatch"),
    (["--model", f"{FIXTURE}:load_run_without_eval"], "inference_not_deterministic"),
    (["--encode", f"{FIXTURE}:encode_with_bos"], "train_inference_mismatch"),
    (["--tokenizer", "WS"], "decode_adds_spaces"),
])
def test_inference_faults_are_named(user_env, extra, problem, capsys):
    root, user = user_env
    argv = user + [str(root / "ws.json") if a == "WS" else a for a in extra]
    code, result, out = check(argv, capsys)
    assert code == 1 and result["verdict"] == "BROKEN", out
    assert problem in result["problems"] and result["diagnosis"] == "inference_path", out
    assert f"{problem} ({PROBLEMS[problem]['part']}:" in out  # the part it blames, with the fix below it


def test_packed_folder_with_an_inverted_scale(world, capsys):
    root = world["root"]
    code, result, out = check(["--checkpoint", str(root / "ts_inverted"), "--text", str(root / "heldout.txt")], capsys)
    assert code == 1 and "inverted_weight_scale" in result["problems"], out
    assert result["diagnosis"] == "inference_path" and "(export:" in out


def test_coupled_weight_decay_is_a_training_problem_from_the_checkpoint_alone(world, capsys):
    code, result, out = check(["--checkpoint", str(world["root"] / "coupled")], capsys)
    assert code == 1 and result["diagnosis"] == "training", out
    assert result["problems"][0] in ("coupled_weight_decay", "collapsed_weights")


def test_bad_input_is_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for argv in (["--checkpoint", str(tmp_path / "nope")], ["--model", f"{FIXTURE}:user_dir", "--tokenizer", "x"]):
        proc = subprocess.run([sys.executable, "-m", "bitnet.check_model", *argv], capture_output=True, text=True,
                              cwd=REPO, env={**env, "CHECK_MODEL_USER_DIR": str(tmp_path)}, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:"), proc.stderr
