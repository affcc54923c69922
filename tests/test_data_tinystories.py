"""TinyStories data: story splitting, one-line errors, the token cache, the tokenizer, the hub
path (with a fake `datasets`), batches and evaluation. Small slices of ../shared/data/tinystories
are made at test time; nothing here touches the network."""
import math
import runpy
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet import data_tinystories as dts
from bitnet.config_tiny import BitNetConfigTinyCPU
from bitnet.data_tinystories import EOT, HubSplit, TinyStoriesTask
from bitnet.text_tokenizer import save_tokenizer, train_bpe

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data/tinystories"
needs_data = pytest.mark.skipif(not (DATA / "train.txt").exists(), reason=f"no TinyStories text at {DATA}")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # should anything reach for the hub, it fails at once


def official(stories: list[str]) -> str:
    return "".join(f"{s}\n{EOT}\n" for s in stories)


def first_stories(path: Path, n_bytes: int) -> str:
    """The whole stories within the first n_bytes of an official-format file."""
    text = path.read_text(encoding="utf-8")
    return text[: text.index(EOT, n_bytes) + len(EOT) + 1]


def small_cfg(**overrides):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64, batch_size=8, eval_tokens=1024,
                sample_tokens=8, seed=7, dtype="fp32")
    return BitNetConfigTinyCPU().with_overrides([f"{k}={v}" for k, v in {**base, **overrides}.items()])


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """~300 KB of training stories, ~60 KB of validation stories, and a 2,048-token tokenizer trained on them."""
    if not (DATA / "train.txt").exists():
        pytest.skip(f"no TinyStories text at {DATA}")
    d = tmp_path_factory.mktemp("tinystories")
    (d / "train.txt").write_text(first_stories(DATA / "train.txt", 300_000), encoding="utf-8")
    (d / "valid.txt").write_text(first_stories(DATA / "valid.txt", 60_000), encoding="utf-8")
    tok = train_bpe(dts.iter_stories(str(d / "train.txt")), 2048, show_progress=False)
    save_tokenizer(tok, str(d / "tokenizer"))
    return d


# ----------------------------------------------------------------------------- stories and errors

def test_split_exactly_at_endoftext(tmp_path):
    stories = ["One day, Tom ran.\n\nHe was happy.", "A cat said <|endoft and <endoftext|> here.", "  Spot. Spot saw a car."]
    text = official(stories) + "\n"
    want = ["One day, Tom ran.\nHe was happy.", "A cat said <|endoft and <endoftext|> here.", "Spot. Spot saw a car."]
    assert dts.split_stories(text) == want
    path = tmp_path / "s.txt"
    path.write_text(text, encoding="utf-8")
    for chunk in (1, 7, 1 << 20):  # separators straddling chunk boundaries are still found
        assert list(dts.iter_file_stories(str(path), chunk_bytes=chunk)) == want


@needs_data
def test_file_reader_matches_split_on_real_text():
    text = first_stories(DATA / "train.txt", 200_000)
    stories = dts.split_stories(text)
    assert len(stories) == text.count(EOT) and all("\n\n" not in s for s in stories)
    assert stories[0].startswith("One day, a little girl named Lily found a needle")


def one_line_error(exc_type, fn):
    with pytest.raises(exc_type) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_empty_and_non_utf8_files_give_one_line_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    msg = one_line_error(FileNotFoundError, lambda: list(dts.iter_file_stories(str(missing))))
    assert str(missing) in msg and "--data-dir" in msg

    empty = tmp_path / "empty.txt"
    empty.write_text(f"\n{EOT}\n  \n", encoding="utf-8")
    msg = one_line_error(ValueError, lambda: list(dts.iter_file_stories(str(empty))))
    assert str(empty) in msg and "no stories" in msg
    assert "no stories" in one_line_error(ValueError, lambda: dts.read_text_file(str(empty)))

    bad = tmp_path / "latin1.txt"
    good = official(["Once upon a time."]).encode()
    bad.write_bytes(good + "The café.".encode("latin-1") + f"\n{EOT}\n".encode())
    offset = len(good) + len("The caf")
    for read in (lambda: list(dts.iter_file_stories(str(bad))), lambda: dts.read_text_file(str(bad))):
        msg = one_line_error(ValueError, read)
        assert str(bad) in msg and f"byte offset {offset}" in msg and "UTF-8" in msg

    msg = one_line_error(FileNotFoundError, lambda: dts.resolve_sources(data_dir=str(tmp_path / "no-dir")))
    assert "no-dir" in msg


def test_resolve_sources(tmp_path):
    assert dts.resolve_sources() == (HubSplit("train"), HubSplit("validation"))
    train, val = dts.resolve_sources(data_dir=str(tmp_path))
    assert (train, val) == (str(tmp_path / "train.txt"), str(tmp_path / "valid.txt"))
    assert dts.resolve_sources(str(tmp_path), val_file="v.txt")[1] == "v.txt"
    one_line_error(ValueError, lambda: dts.resolve_sources(train_file="t.txt"))


@needs_data
def test_task_reports_missing_and_empty_data(data, tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    make = lambda train: TinyStoriesTask(small_cfg(), str(data / "tokenizer"), train, str(data / "valid.txt"),  # noqa: E731
                                         str(tmp_path / "cache"))
    assert "empty.txt" in one_line_error(ValueError, lambda: make(str(tmp_path / "empty.txt")))
    assert "missing.txt" in one_line_error(FileNotFoundError, lambda: make(str(tmp_path / "missing.txt")))
    assert not list((tmp_path / "cache").glob("*.tmp.*")), "a failed build must not leave temporary files"
    msg = one_line_error(FileNotFoundError, lambda: TinyStoriesTask(small_cfg(), str(tmp_path), str(data / "train.txt"),
                                                                    str(data / "valid.txt"), str(tmp_path / "cache")))
    assert "tokenizer.json" in msg and "train_tinystories_tokenizer.py" in msg


# ----------------------------------------------------------------------------- tokenizer

@needs_data
def test_tokenizer_loads_with_autotokenizer_and_round_trips(data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    assert len(tok) == 2048 and tok.eos_token == EOT and tok.pad_token is not None
    assert tok.convert_tokens_to_ids(EOT) == 0
    text = (data / "valid.txt").read_text(encoding="utf-8")  # official format, separators included
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(0) == text.count(EOT)  # <|endoftext|> is one special token, never split
    tricky = " Spot.  Two  spaces\n\ttab, emoji 🙂, mojibake â€œ, no trailing newline"
    assert tok.decode(tok(tricky)["input_ids"]) == tricky


def run_script(name: str, args: list[str], monkeypatch) -> int:
    """Run a repo-root script in this process (no second interpreter start); returns its exit code."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    try:
        runpy.run_path(str(REPO / name), run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


@needs_data
def test_tokenizer_script(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tok"
    code = run_script("train_tinystories_tokenizer.py", ["--out-dir", str(out), "--vocab-size", "512", "--train-file",
                      str(data / "valid.txt"), "--val-file", str(data / "valid.txt")], monkeypatch)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "round-trip exact" in printed.out and "stories" in printed.out and (out / "tokenizer.json").exists()
    code = run_script("train_tinystories_tokenizer.py", ["--out-dir", str(tmp_path / "tok2")], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--data-dir" in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- token cache

@needs_data
def test_cache_reused_and_rebuilt_when_tokenizer_or_data_change(data, tmp_path, monkeypatch):
    builds = []
    real_build = dts.build_token_cache
    monkeypatch.setattr(dts, "build_token_cache", lambda *a: builds.append(a[0]) or real_build(*a))
    cache = tmp_path / "cache"
    tok_dir = str(data / "tokenizer")
    train, val = str(data / "train.txt"), str(data / "valid.txt")

    task = TinyStoriesTask(small_cfg(), tok_dir, train, val, str(cache))
    assert len(builds) == 2
    files = sorted(cache.glob("*.bin"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    stream = np.asarray(task.train_tokens)
    assert stream.dtype == np.uint16 and stream[0] == stream[-1] == task.eot
    assert (stream == task.eot).sum() == len(dts.split_stories(Path(train).read_text(encoding="utf-8"))) + 1

    again = TinyStoriesTask(small_cfg(), tok_dir, train, val, str(cache))  # reused: nothing re-tokenized
    assert len(builds) == 2 and [f.stat().st_mtime_ns for f in sorted(cache.glob("*.bin"))] == mtimes
    assert np.array_equal(again.train_tokens, stream)

    other_tok = tmp_path / "tok1024"
    save_tokenizer(train_bpe(dts.iter_stories(val), 1024, show_progress=False), str(other_tok))
    TinyStoriesTask(small_cfg(), str(other_tok), train, val, str(cache))  # new tokenizer: both rebuilt
    assert len(builds) == 4 and len(list(cache.glob("*.bin"))) == 4

    changed = tmp_path / "train.txt"
    changed.write_text(Path(train).read_text(encoding="utf-8") + official(["One more story."]), encoding="utf-8")
    TinyStoriesTask(small_cfg(), tok_dir, str(changed), val, str(cache))  # new data: train rebuilt, val reused
    assert builds[4:] == [str(changed)]
    assert not list(cache.glob("*.tmp.*"))


# ----------------------------------------------------------------------------- the hub path

class FakeDatasets(types.ModuleType):
    """Stands in for `datasets`: load_dataset streams a few rows, or fails like a dead network."""

    def __init__(self, rows=None, error=None):
        super().__init__("datasets")
        self.rows, self.error, self.calls = rows or {}, error, []

    def load_dataset(self, name, split=None, streaming=False):
        self.calls.append((name, split, streaming))
        if self.error:
            raise self.error
        return ({"text": t} for t in self.rows[split])  # an iterable, as a streaming dataset is


@needs_data
def test_hub_streaming_with_a_fake_datasets(data, tmp_path, monkeypatch):
    stories = dts.split_stories((data / "valid.txt").read_text(encoding="utf-8"))
    # the hub's parquet text separates paragraphs with "\n\n"; the loader normalises it
    fake = FakeDatasets(rows={"train": [s.replace("\n", "\n\n") for s in stories[:40]] + ["  "],
                              "validation": [s + "\n" for s in stories[40:60]]})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    train, val = dts.resolve_sources()
    assert list(dts.iter_stories(train)) == stories[:40]
    task = TinyStoriesTask(small_cfg(), str(data / "tokenizer"), train, val, str(tmp_path / "cache"))
    assert ("roneneldan/TinyStories", "train", True) in fake.calls
    assert ("roneneldan/TinyStories", "validation", True) in fake.calls
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "cache").glob("*.bin")) == ["train", "validation"]
    assert np.array_equal(task.val_tokens, dts.text_tokens(task.tok, official(stories[40:60])))


def test_hub_unreachable_gives_one_line_with_the_local_fix(monkeypatch):
    fake = FakeDatasets(error=ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub\nretrying"))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: fail at once, without asking datasets
    msg = one_line_error(ValueError, lambda: list(dts.iter_stories(HubSplit("train"))))
    assert "HF_HUB_OFFLINE" in msg and "--data-dir" in msg and "--train-file" in msg and fake.calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    msg = one_line_error(ValueError, lambda: list(dts.iter_stories(HubSplit("validation"))))
    assert "ConnectionError" in msg and "--data-dir" in msg and len(fake.calls) == 1


# ----------------------------------------------------------------------------- batches and evaluation

@needs_data
def test_get_batch_is_a_pure_function_of_seed_and_step(data, tmp_path):
    make = lambda seed: TinyStoriesTask(small_cfg(seed=seed), str(data / "tokenizer"), str(data / "train.txt"),  # noqa: E731
                                        str(data / "valid.txt"), str(tmp_path))
    a, b, c = make(1), make(1), make(2)
    x, y = a.get_batch(5, 4)
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is the next token
    a.get_batch(6, 4)  # no hidden state: other calls in between change nothing
    assert torch.equal(b.get_batch(5, 4)[0], x) and torch.equal(a.get_batch(5, 4)[0], x)
    assert not torch.equal(a.get_batch(6, 4)[0], x) and not torch.equal(c.get_batch(5, 4)[0], x)


def test_eval_windows_do_not_overlap():
    for n_stream, context, n_tokens in [(1000, 64, 256), (1000, 64, 0), (1000, 64, 10**6), (50, 64, 0), (1000, 64, 10)]:
        windows = dts.eval_windows(n_stream, context, n_tokens)
        targets = [t for s, n in windows for t in range(s + 1, s + n + 1)]
        assert len(targets) == len(set(targets)) and max(targets) < n_stream
        if n_tokens <= 0:
            assert sorted(targets) == list(range(1, n_stream))  # every token once
    assert sum(n for _, n in dts.eval_windows(1000, 64, 256)) == 256


class UniformModel(torch.nn.Module):
    """Equal logits everywhere: the loss of every token is exactly ln(vocab)."""

    def __init__(self, vocab, context):
        super().__init__()
        self.vocab, self.config = vocab, types.SimpleNamespace(max_position_embeddings=context)

    def forward(self, x, labels=None):
        return torch.zeros(*x.shape, self.vocab), None


@needs_data
def test_bits_per_byte_on_a_tiny_case(data):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data / "tokenizer/tokenizer.json"))
    stories = ["Tom had a café. “Hi!” â€œ he said.\nThe end.", "Sue ran 🙂 fast."]  # multi-byte characters
    m = dts.text_metrics(UniformModel(2048, 8), tok, official(stories), "cpu")
    n_bytes = sum(len(s.encode("utf-8")) for s in stories)  # <|endoftext|> counts no bytes
    assert m["n_tokens"] == len(dts.text_tokens(tok, official(stories))) - 1
    assert m["val_loss"] == pytest.approx(math.log(2048))
    assert m["bits_per_byte"] == pytest.approx(m["n_tokens"] * math.log2(2048) / n_bytes)
    # per-token byte counts are what lets a window cut a multi-byte character and still count right
    lengths = dts.token_byte_lengths(tok)
    ids = dts.text_tokens(tok, official(stories)).tolist()
    assert lengths[ids].sum() == n_bytes and lengths[0] == 0
    for i in ids:
        piece = tok.decode([i])
        if "\ufffd" not in piece:  # a whole character or more
            assert lengths[i] == len(piece.encode("utf-8"))
    part = dts.text_metrics(UniformModel(2048, 4), tok, official(stories), "cpu", max_tokens=8)
    assert part["n_tokens"] == 8 and part["val_loss"] == pytest.approx(math.log(2048))


@needs_data
def test_tiny_model_evaluates_near_ln_vocab_at_init(data, tmp_path):
    from bitnet.model import BitNetForCausalLM

    cfg = small_cfg()
    task = TinyStoriesTask(cfg, str(data / "tokenizer"), str(data / "train.txt"), str(data / "valid.txt"), str(tmp_path))
    identity = task.identity()
    assert identity["task"] == "tinystories" and dts.tokenizer_from_identity(identity).get_vocab_size() == 2048
    torch.manual_seed(0)
    model = BitNetForCausalLM(cfg).eval()
    m = task.evaluate(model, torch.device("cpu"), 0)
    assert abs(m["val_loss"] - math.log(cfg.vocab_size)) < 0.3
    assert abs(m["train_loss_eval"] - math.log(cfg.vocab_size)) < 0.3
    assert m["eval_tokens"] == cfg.eval_tokens and 0 < m["bits_per_byte"] < 8
    assert [s.split()[0] for s in m["samples"]] == ["Once", "Lily", "The"]
    assert task.evaluate(model, "cpu", 0)["samples"] == m["samples"]  # seeded: the same stories each time
    assert "val loss" in task.format_eval(m) and "\n" not in task.format_eval(m)
