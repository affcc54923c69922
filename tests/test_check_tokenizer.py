"""check_tokenizer on tokenizers trained here on a slice of the shared TinyStories text: ours
(byte-level BPE, train_bpe) is lossless; a Whitespace pre-tokenizer without a decoder, a
Lowercase normalizer and a WordLevel vocabulary with [UNK] are each named."""
import json
from pathlib import Path

import pytest

from bitnet import check_tokenizer
from bitnet.text_tokenizer import save_tokenizer, train_bpe
from bitnet.data_tinystories import split_stories

# the shared data sits beside the checkout (../shared), however deep the checkout is
STORIES = next((p / "shared" / "data" / "tinystories" for p in Path(__file__).resolve().parents
                if (p / "shared" / "data" / "tinystories").is_dir()), Path("../shared/data/tinystories"))


@pytest.fixture(scope="module")
def stories():
    path = STORIES / "train.txt"
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared TinyStories data)")
    return split_stories(path.read_text(encoding="utf-8")[:300_000])


@pytest.fixture(scope="module")
def text_file(stories, tmp_path_factory):
    """The text checked: stories the tokenizers were trained on (so only the tokenizer's own
    faults, not unseen characters, show)."""
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text("<|endoftext|>".join(stories[:200]), encoding="utf-8")
    return str(path)


def whitespace_bpe(stories, normalizer=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # and no decoder: decode() joins pieces with spaces
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.train_from_iterator(stories, trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"], show_progress=False))
    return tok


def run(capsys, *argv) -> tuple[int, dict, str]:
    code = check_tokenizer.main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1]), out


def test_our_tokenizer_is_ok_as_a_file_and_as_a_transformers_folder(stories, text_file, tmp_path, capsys):
    save_tokenizer(train_bpe(stories, vocab_size=400, show_progress=False), str(tmp_path))
    for path in (str(tmp_path / "tokenizer.json"), str(tmp_path)):
        code, report, out = run(capsys, path, "--text", text_file)
        assert code == 0 and report["verdict"] == "OK" and report["problems"] == []
        assert report["exact_match_rate"] == 1.0 and report["unk_rate"] == 0.0
        assert 1.5 < report["bytes_per_token"] < 5  # 400 tokens of byte-level BPE on English
        assert "first difference" not in out


def test_whitespace_pre_tokenizer_without_decoder_adds_spaces(stories, text_file, tmp_path, capsys):
    path = tmp_path / "ws.json"
    whitespace_bpe(stories).save(str(path))
    code, report, out = run(capsys, str(path), "--text", text_file)
    assert code == 1 and report["problems"] == ["decode_adds_spaces"]
    assert report["exact_match_rate"] < 0.05 and report["unk_rate"] == 0.0
    assert "first difference (decode_adds_spaces" in out


def test_lowercase_normalizer_is_lossy(stories, text_file, tmp_path, capsys):
    from tokenizers import normalizers
    tok = train_bpe(stories, vocab_size=400, show_progress=False)  # byte-level: every character encodes
    tok.normalizer = normalizers.Lowercase()
    path = tmp_path / "lower.json"
    tok.save(str(path))
    code, report, _ = run(capsys, str(path), "--text", text_file)
    assert code == 1 and report["problems"] == ["lossy_normalizer"] and report["unk_rate"] == 0.0


def test_word_level_with_unk_tokens(stories, text_file, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(stories[:50], trainers.WordLevelTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                                  show_progress=False))
    path = tmp_path / "words.json"
    tok.save(str(path))
    code, report, _ = run(capsys, str(path), "--text", text_file)
    assert code == 1 and "unk_tokens" in report["problems"] and report["unk_rate"] > 0.01


def test_unreadable_tokenizer_or_text_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for argv in ([str(tmp_path / "missing")], [str(bad)], [str(bad), "--text", str(tmp_path / "none.txt")]):
        assert check_tokenizer.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
