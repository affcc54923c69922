"""The GPU presets, run on the CPU for a few steps with a reduced batch, in bf16 autocast and in
fp32: the model shapes and code paths a GPU user takes (the seed's 5M arithmetic and 12M
TinyStories configs) are exercised here even though no test machine has a GPU."""
import math
import os

import pytest
import torch

from bitnet.config_tiny import PRESETS
from bitnet.data_arithmetic import ArithmeticTask
from bitnet.model import BitNetForCausalLM
from bitnet.build import autocast_for, pick_device
from bitnet.checkpoint import load_checkpoint
from bitnet.errors import TrainingError
from bitnet.trainer import train

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "shared", "data", "tinystories")


@pytest.fixture(scope="module")
def tinystories_task_parts(tmp_path_factory):
    """A 512-token BPE and ~40 KB of real stories: enough for a few windows of the 12M model."""
    if not os.path.exists(os.path.join(DATA, "valid.txt")):
        pytest.skip(f"no TinyStories text at {DATA}")
    from bitnet.text_tokenizer import save_tokenizer, train_bpe
    from bitnet.data_tinystories import iter_stories
    tmp = tmp_path_factory.mktemp("ts")
    text = open(os.path.join(DATA, "valid.txt"), encoding="utf-8").read()
    (tmp / "valid.txt").write_text(text[: text.index("<|endoftext|>", 40_000) + len("<|endoftext|>\n")], encoding="utf-8")
    save_tokenizer(train_bpe(iter_stories(str(tmp / "valid.txt")), 512, show_progress=False), str(tmp / "tok"))
    return tmp


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("preset", ["arithmetic", "tiny"])
def test_gpu_preset_trains_on_cpu(preset, dtype, tmp_path, request):
    overrides = ["batch_size=2", "max_steps=3", "eval_interval=3", "warmup_steps=2", f"dtype={dtype}", "compile=false"]
    if preset == "arithmetic":
        cfg = PRESETS[preset]().with_overrides(overrides + ["eval_problems=4"])
        task = ArithmeticTask(cfg)
        assert 4.5e6 < BitNetForCausalLM(cfg).num_parameters() < 5.2e6  # the seed's ~5M model
    else:
        from bitnet.data_tinystories import TinyStoriesTask
        parts = request.getfixturevalue("tinystories_task_parts")
        cfg = PRESETS[preset]().with_overrides(overrides + ["eval_tokens=512", "sample_tokens=2"])
        task = TinyStoriesTask(cfg, str(parts / "tok"), str(parts / "valid.txt"), str(parts / "valid.txt"),
                               str(tmp_path / "cache"))
    assert isinstance(autocast_for(torch.device("cpu"), dtype), torch.autocast) == (dtype == "bf16")
    result = train(cfg, task, str(tmp_path / "run"), device="cpu", quiet=True)
    first, last = result["history"][0], result["final"]
    assert last["step"] == 3 and math.isfinite(last["val_loss"])
    if preset == "tiny":  # a fresh model's loss sits near ln(vocab) (answer-only arithmetic loss does not)
        assert abs(first["val_loss"] - math.log(cfg.vocab_size)) < 1.0
    assert load_checkpoint(str(tmp_path / "run"))["step"] == 3


def test_cuda_asked_for_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(TrainingError, match="no CUDA GPU is visible; use --device cpu"):
        pick_device("cuda")
