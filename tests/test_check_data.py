"""check_data on loaders written the ways real training code writes them (tests/fixtures/data_loaders.py),
over a slice of the shared TinyStories text and tokenizers trained on it here: each fault BROKEN and
named (exit 1), the correct loaders and our own three OK (exit 0), bad input one line (exit 2)."""
import json
from pathlib import Path

import pytest
from conftest import story_corpus

from bitnet import check_data
from bitnet.text_tokenizer import save_tokenizer, train_bpe
from bitnet.data_tinystories import EOT

ROOT = Path(__file__).resolve().parents[1]
LOADERS = str(ROOT / "tests" / "fixtures" / "data_loaders.py")
FACTORIES = str(ROOT / "examples" / "data_factories.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A data folder in the official format: 600 training and 150 validation stories."""
    out = tmp_path_factory.mktemp("corpus")
    train, _ = story_corpus(out, 600_000, 600, 150_000, 150)
    (out / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in train), encoding="utf-8")
    return {"dir": out, "train": str(out / "train.txt"), "valid": str(out / "valid.txt"), "stories": train}


@pytest.fixture(scope="module")
def tokenizers(corpus, tmp_path_factory):
    """Ours (byte-level BPE, a transformers folder), one with a Whitespace pre-tokenizer and no decoder,
    and a byte-level one whose post-processor puts <s> first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    out = tmp_path_factory.mktemp("tok")
    ours = train_bpe(corpus["stories"], vocab_size=512, show_progress=False)
    save_tokenizer(ours, str(out / "ours"))
    ws = Tokenizer(models.BPE(unk_token="[UNK]"))
    ws.pre_tokenizer = pre_tokenizers.Whitespace()
    ws.train_from_iterator(corpus["stories"], trainers.BpeTrainer(vocab_size=512, special_tokens=["[UNK]", EOT],
                                                                  show_progress=False))
    ws.save(str(out / "ws.json"))
    bos = train_bpe(corpus["stories"], vocab_size=512, show_progress=False)
    bos.add_special_tokens(["<s>"])
    bos.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos.token_to_id("<s>"))])
    bos.save(str(out / "bos.json"))
    return {"dir": str(out / "ours"), "json": str(out / "ours" / "tokenizer.json"), "ws": str(out / "ws.json"),
            "bos": str(out / "bos.json")}


def run(capsys, *argv) -> tuple[int, dict, str]:
    code = check_data.main([str(a) for a in argv])
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1]), out


def loader(capsys, corpus, name, tokenizer, *extra, max_batches=30):
    kwargs = json.dumps({"tokenizer": tokenizer, "text": corpus["train"]})
    return run(capsys, "--batches", f"{LOADERS}:{name}", "--tokenizer", tokenizer, "--kwargs", kwargs,
               "--max-batches", max_batches, *extra)


def test_correct_packed_loader_is_ok_and_shows_the_picture(capsys, corpus, tokenizers):
    code, report, out = loader(capsys, corpus, "packed", tokenizers["json"])
    assert code == 0 and report == {"verdict": "OK", "problems": [], "convention": "dict(input_ids, targets)"}
    assert "labels are the inputs shifted by one" in out
    assert "[<|endoftext|>]" in out and "\u23ce" in out  # a boundary and a newline, made visible
    assert "documents: " in out and "complete" in out and "most frequent tokens: " in out


def test_packing_without_separators(capsys, corpus, tokenizers):
    code, report, out = loader(capsys, corpus, "packed_no_separator", tokenizers["json"])
    assert code == 1 and report["problems"] == ["no_document_separator"]
    assert "runs into the next one's start" in out


def test_nanogpt_get_batch_unshifted_and_shifted(capsys, corpus, tokenizers):
    code, report, _ = loader(capsys, corpus, "nanogpt_unshifted", tokenizers["json"])
    assert code == 1 and report["problems"] == ["unshifted_labels"] and report["convention"] == "(x, y)"
    code, report, _ = loader(capsys, corpus, "nanogpt", tokenizers["json"])
    assert code == 0 and report["problems"] == []


def test_labels_equal_input_ids_for_a_model_that_does_not_shift(capsys, corpus, tokenizers):
    code, report, _ = loader(capsys, corpus, "hf_labels_masked", tokenizers["dir"])
    assert code == 0 and report["convention"] == "dict(input_ids, labels, attention_mask)"
    code, report, _ = loader(capsys, corpus, "hf_labels_masked", tokenizers["dir"], "--model-shifts", "no")
    assert code == 1 and report["problems"] == ["unshifted_labels"]
    code, report, out = loader(capsys, corpus, "nanogpt", tokenizers["json"], "--model-shifts", "yes")
    assert code == 1 and report["problems"] == ["labels_misaligned"] and "shifted by the loader and again" in out


def test_pad_ids_counted_in_the_loss(capsys, corpus, tokenizers):
    code, report, out = loader(capsys, corpus, "hf_labels_copy", tokenizers["dir"])
    assert code == 1 and report["problems"] == ["padding_in_loss"]
    assert "sit on padding" in out


def test_padded_input_ids_without_labels_train_on_padding(capsys, corpus, tokenizers):
    code, report, out = loader(capsys, corpus, "padded_ids", tokenizers["dir"])
    assert code == 1 and report["problems"] == ["padding_in_loss"] and report["convention"] == "input_ids"
    assert "[pad]x" in out
    pad_id = json.loads((Path(tokenizers["dir"]) / "tokenizer.json").read_text())["added_tokens"][1]["id"]
    code, report, _ = loader(capsys, corpus, "padded_ids", tokenizers["dir"], "--ignore-index", pad_id)
    assert code == 0, "a loss that ignores the pad id trains on no padding"


def test_rank_unaware_streaming_loader(capsys, corpus, tokenizers):
    code, report, out = loader(capsys, corpus, "rank_unaware", tokenizers["json"])
    assert code == 1 and report["problems"] == ["ranks_share_data"]
    code, report, _ = loader(capsys, corpus, "rank_aware", tokenizers["json"])
    assert code == 0 and report["problems"] == []


def test_loader_that_restarts_its_iterator(capsys, corpus, tokenizers):
    code, report, out = loader(capsys, corpus, "restarts", tokenizers["json"])
    assert code == 1 and report["problems"] == ["repeated_batches"] and "identical to batch 0" in out


def test_whitespace_pre_tokenizer(capsys, corpus, tokenizers):
    code, report, _ = loader(capsys, corpus, "packed", tokenizers["ws"])
    assert code == 1 and set(report["problems"]) == {"whitespace_lost", "decode_adds_spaces"}
    code, report, out = loader(capsys, corpus, "packed", tokenizers["ws"], "--text", corpus["train"])
    assert code == 1 and set(report["problems"]) == {"whitespace_lost", "decode_adds_spaces"}
    assert "tokenizer_roundtrip" in out


def test_raw_text_round_trip_shared_with_check_tokenizer(capsys, corpus, tokenizers, tmp_path):
    """A Lowercase normalizer leaves no trace in the batches alone; the raw text's round trip names it."""
    from tokenizers import Tokenizer, normalizers
    tok = Tokenizer.from_file(tokenizers["json"])
    tok.normalizer = normalizers.Lowercase()
    path = str(tmp_path / "lower.json")
    tok.save(path)
    code, report, _ = loader(capsys, corpus, "packed", path)
    assert code == 0
    code, report, _ = loader(capsys, corpus, "packed", path, "--text", corpus["train"])
    assert code == 1 and report["problems"] == ["lossy_normalizer"]
    code, report, _ = loader(capsys, corpus, "packed", tokenizers["json"], "--text", corpus["train"])
    assert code == 0 and report["problems"] == []


def test_bos_at_inference_absent_from_training(capsys, corpus, tokenizers):
    code, report, out = loader(capsys, corpus, "packed_with_template", tokenizers["bos"])
    assert code == 1 and report["problems"] == ["train_inference_mismatch"] and "inference puts <s> first" in out


def test_ids_beyond_the_model_vocabulary(capsys, corpus, tokenizers):
    code, report, _ = loader(capsys, corpus, "packed", tokenizers["json"], "--vocab-size", 300)
    assert code == 1 and report["problems"] == ["token_out_of_range"]


def test_hub_loader_on_local_files_validation_from_the_training_stream(capsys, corpus, tokenizers, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kwargs = json.dumps({"tokenizer": tokenizers["json"]})
    common = ["--batches", f"{LOADERS}:hub_train", "--tokenizer", tokenizers["json"], "--kwargs", kwargs,
              "--max-batches", 30, "--local-dataset", f"roneneldan/TinyStories={corpus['train']}",
              "--local-dataset", f"roneneldan/TinyStories:validation={corpus['valid']}"]
    code, report, out = run(capsys, *common, "--val-batches", f"{LOADERS}:hub_val_from_train")
    assert code == 1 and report["problems"] == ["val_in_train"] and "validation measures memory" in out
    code, report, _ = run(capsys, *common, "--val-batches", f"{LOADERS}:hub_val")
    assert code == 0 and report["problems"] == []


def test_hub_to_local_serves_stories_and_passes_other_names_through(corpus):
    import datasets
    from bitnet.diagnose.local_hub import hub_to_local, parse_mapping
    original = datasets.load_dataset
    with hub_to_local(parse_mapping([f"roneneldan/TinyStories={corpus['train']}"])):
        stream = datasets.load_dataset("roneneldan/TinyStories", split="train", streaming=True)
        assert stream.column_names == ["text"]  # loaders call .map(..., remove_columns=ds.column_names)
        rows = list(stream.take(3))
        whole = datasets.load_dataset("roneneldan/TinyStories", split="train")
    assert [r["text"] for r in rows] == corpus["stories"][:3] and len(whole) == len(corpus["stories"])
    assert datasets.load_dataset is original


def test_our_arithmetic_loader_is_ok(capsys):
    code, report, out = run(capsys, "--batches", f"{FACTORIES}:arithmetic", "--val-batches", f"{FACTORIES}:arithmetic_val",
                            "--tokenizer", f"{FACTORIES}:arithmetic_tokenizer", "--max-batches", 50)
    assert code == 0 and report == {"verdict": "OK", "problems": [], "convention": "(x, y)"}
    assert "[<bos>]" in out and "[pad]x" in out


def test_our_tinystories_loader_is_ok(capsys, corpus, tokenizers, tmp_path):
    kwargs = json.dumps({"tokenizer_dir": tokenizers["dir"], "data_dir": str(corpus["dir"]), "cache_dir": str(tmp_path),
                         "context": 128})
    code, report, _ = run(capsys, "--batches", f"{FACTORIES}:tinystories", "--val-batches", f"{FACTORIES}:tinystories_val",
                          "--encode", f"{FACTORIES}:tinystories_prompt", "--tokenizer", tokenizers["dir"],
                          "--kwargs", kwargs, "--max-batches", 30)
    assert code == 0 and report["problems"] == []


def test_our_fineweb_loader_is_ok(capsys, corpus, tokenizers):
    kwargs = json.dumps({"tokenizer_dir": tokenizers["dir"], "data_files": [str(corpus["dir"] / "docs.jsonl")],
                         "context": 128, "val_docs": 40})
    code, report, _ = run(capsys, "--batches", f"{FACTORIES}:fineweb", "--val-batches", f"{FACTORIES}:fineweb_val",
                          "--tokenizer", tokenizers["json"], "--kwargs", kwargs, "--max-batches", 20)
    assert code == 0 and report["problems"] == []


@pytest.mark.parametrize("argv", [
    ["--batches", "no_such_module_xyz:f"],
    ["--batches", f"{LOADERS}:packed", "--kwargs", "{not json"],
    ["--batches", f"{LOADERS}:packed", "--kwargs", '{"tokenizer": "/nonexistent.json", "text": "/nonexistent.txt"}'],
    ["--batches", f"{LOADERS}:EOT"],  # a string: not batches
    ["--batches", f"{LOADERS}:packed"],  # its arguments not given: the line says --kwargs
    ["--batches", f"{LOADERS}:packed", "--tokenizer", "/nonexistent/tokenizer.json"],
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv):
    assert check_data.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("eos,code,problems", [(False, 1, ["no_document_separator"]), (True, 0, [])])
def test_run_clm_style_hub_loader_from_the_command_line(corpus, tokenizers, eos, code, problems):
    """A fresh process, so the loader's module-level `from datasets import load_dataset` binds the redirect."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    kwargs = json.dumps({"tokenizer_dir": tokenizers["dir"], "eos_between_documents": eos})
    proc = subprocess.run([sys.executable, "-m", "bitnet.check_data", "--batches",
                           str(ROOT / "tests" / "fixtures" / "hub_clm_loader.py:train_loader"), "--tokenizer",
                           tokenizers["dir"], "--kwargs", kwargs, "--max-batches", "20",
                           "--local-dataset", f"roneneldan/TinyStories={corpus['train']}"],
                          capture_output=True, text=True, env=env, timeout=300)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == code and report["problems"] == problems, proc.stderr[-2000:]


def test_every_problem_check_data_names_is_a_data_problem_in_the_catalogue():
    import re
    from bitnet.diagnose import data_checks
    from bitnet.diagnose.problems import PROBLEMS
    source = Path(data_checks.__file__).read_text()
    named = set(re.findall(r'result\("\w+", [^\n]*, "(\w+)"\)', source))  # result(check, passed, evidence, "problem")
    named |= {"decode_adds_spaces", "lossy_normalizer", "unk_tokens", "decode_mismatch"}  # the round trip's
    assert len(named) >= 13
    tokenizer = {"whitespace_lost", "decode_adds_spaces", "lossy_normalizer", "unk_tokens", "decode_mismatch"}
    assert {n: PROBLEMS.get(n, {}).get("part") for n in named} == {n: "tokenizer" if n in tokenizer else "data"
                                                                   for n in named}
