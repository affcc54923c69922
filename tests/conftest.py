"""Shared settings for the core test suite.

One torch thread (the suite shares small CPU machines and must be deterministic), no
network for transformers, and a factory for the tiny configs the tests train.
"""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the shared TinyStories text sits beside the checkout (../shared), however deep the checkout is
STORIES = next((p / "shared" / "data" / "tinystories" for p in Path(__file__).resolve().parents
                if (p / "shared" / "data" / "tinystories").is_dir()), Path("../shared/data/tinystories"))


def story_corpus(out: Path, train_chars: int, n_train: int, valid_chars: int, n_valid: int) -> tuple[list, list]:
    """train.txt and valid.txt in the official format (each story then a line <|endoftext|>) from
    the start of the shared TinyStories files; skips the test where that data is not here."""
    from bitnet.data_tinystories import EOT, split_stories
    if not (STORIES / "train.txt").exists():
        pytest.skip(f"{STORIES} is not here (the shared TinyStories data)")
    train = split_stories((STORIES / "train.txt").read_text(encoding="utf-8")[:train_chars])[:n_train]
    valid = split_stories((STORIES / "valid.txt").read_text(encoding="utf-8")[:valid_chars])[:n_valid]
    for name, docs in (("train.txt", train), ("valid.txt", valid)):
        (out / name).write_text("".join(f"{d}\n{EOT}\n" for d in docs), encoding="utf-8")
    return train, valid


def pytest_configure(config):
    # transformers' BitNet code still calls torch.jit.script_method; not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture
def no_compile():
    """transformers' quantizer forwards are @torch.compile'd: run them eagerly (no inductor build).
    set_stance is torch's public switch for this."""
    torch.compiler.set_stance("force_eager")
    yield
    torch.compiler.set_stance("default")


def assert_dicts_close(a: dict, b: dict, rel: float = 1e-5):
    """Field by field: numbers within `rel`, everything else (strings, lists of samples) equal."""
    assert a.keys() == b.keys(), f"keys differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        if isinstance(a[k], (int, float)) and not isinstance(a[k], bool):
            assert a[k] == pytest.approx(b[k], rel=rel), f"{k}: {a[k]} != {b[k]}"
        else:
            assert a[k] == b[k], f"{k}: {a[k]!r} != {b[k]!r}"


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model_cfg():
    """Factory: a small model config (hidden 32, 2 layers, GQA 4/2 heads) with overrides."""
    from bitnet.config_tiny import BitNetConfig

    def make(**overrides):
        base = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
                    dtype="fp32", dropout=0.0)
        base.update(overrides)
        return BitNetConfig(**base)

    return make


@pytest.fixture(scope="session")
def arith_cfg():
    """Factory: a tiny arithmetic experiment ('*' with operands 0-5) that learns in 200 CPU steps."""
    from bitnet.config_tiny import BitNetConfigArithmetic

    def make(**overrides):
        base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=16, batch_size=32, learning_rate=5e-3,
                    warmup_steps=10, max_steps=200, eval_interval=200, weight_decay=0.0,
                    operators="*", add_max=9, sub_max=9, mul_max=5, div_max=5, heldout_fraction=0.1,
                    eval_problems=50, dtype="fp32", dropout=0.0, seed=1337)
        base.update(overrides)
        return BitNetConfigArithmetic(**base)

    return make
