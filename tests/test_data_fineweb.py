"""The FineWeb-Edu loader, offline, on small shards with the dataset's schema that the tests write:
ranks read disjoint documents and never the validation ones, batches are the packed stream, the
position survives a checkpoint, and train() resumes mid-stream exactly."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bitnet.config_tiny import BitNetConfigTiny
from bitnet.data_fineweb import DocSource, FineWebTask, TokenStream
from bitnet.text_tokenizer import save_tokenizer, train_bpe
from bitnet.checkpoint import load_checkpoint
from bitnet.trainer import train
from conftest import assert_dicts_close

WORDS = ("the cell energy light plant water history river empire trade function number proof "
         "students learn science method data value change system earth heat").split()
VAL_DOCS = 5


def documents(n: int, start: int = 0) -> list[str]:
    return [f"Document {i}. " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(15 + i % 25)) + "."
            for i in range(start, start + n)]


def rows(texts, field="text"):
    # the fields of HuggingFaceFW/fineweb-edu
    return [{field: t, "id": f"<urn:uuid:{i:08d}>", "dump": "CC-MAIN-2024-10", "url": f"https://example.org/{i}",
             "file_path": "s3://x", "language": "en", "language_score": 0.95, "token_count": len(t.split()),
             "score": 3.2, "int_score": 3} for i, t in enumerate(texts)]


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two jsonl shards of 60 documents, and a tokenizer trained on them."""
    d = tmp_path_factory.mktemp("fineweb")
    files = [write_jsonl(d / f"part{k}.jsonl", rows(documents(60, 60 * k))) for k in range(2)]
    tok_dir = str(d / "tok")
    save_tokenizer(train_bpe(documents(120), 320, show_progress=False), tok_dir)
    return files, tok_dir


def small_cfg(**kw):
    base = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=16, batch_size=4, eval_tokens=128, sample_tokens=4,
                dtype="fp32", warmup_steps=2, max_steps=8, eval_interval=4, min_lr_ratio=1.0)
    return BitNetConfigTiny(**{**base, **kw})


@pytest.mark.parametrize("n_files", [1, 2])  # 1 file: every other row per rank; 2 files: one file per rank
def test_ranks_read_disjoint_documents_and_never_the_validation_ones(shards, n_files):
    files, tok_dir = shards
    task = FineWebTask(small_cfg(), tok_dir, DocSource(tuple(files[:n_files])), val_docs=VAL_DOCS)
    val = set(documents(VAL_DOCS))
    seen = [[r["text"] for r in TokenStream(task.source, task.tok, rank, 2, task.val_keys).data] for rank in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(documents(60 * n_files)) - val
    assert abs(len(seen[0]) - len(seen[1])) <= VAL_DOCS


def test_batches_are_the_packed_token_stream_and_resume_from_a_saved_position(shards, tmp_path):
    files, tok_dir = shards
    cfg = small_cfg()
    task = FineWebTask(cfg, tok_dir, DocSource(tuple(files)), val_docs=VAL_DOCS)
    batches = [task.get_rank_batch(step, 3, 0, 1) for step in range(4)]
    for x, y in batches:
        assert x.shape == y.shape == (3, cfg.max_position_embeddings)
        assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # targets: the inputs shifted by one
    stream = torch.cat([x.flatten() for x, _ in batches])
    eot = task.eot
    assert stream[0] == eot and task.tok.decode(stream.tolist()).startswith(documents(VAL_DOCS + 1)[-1][:20])
    path = str(tmp_path / "state.pt")
    torch.save(task.state_dict(), path)
    later = [task.get_rank_batch(step, 3, 0, 1) for step in (4, 5)]
    again = FineWebTask(cfg, tok_dir, DocSource(tuple(files)), val_docs=VAL_DOCS)
    again.load_state_dict(torch.load(path, weights_only=True))  # a safe load reads it back
    for step, (x, y) in zip((4, 5), later):
        x2, y2 = again.get_rank_batch(step, 3, 0, 1)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="at step 6, not 9"):
        again.get_rank_batch(9, 3, 0, 1)


class Crash(Exception):
    pass


class CrashingFineWeb(FineWebTask):
    def get_rank_batch(self, step, rows, rank, world_size):
        if step == 6:
            raise Crash(step)
        return super().get_rank_batch(step, rows, rank, world_size)


def test_train_resumes_mid_stream_like_an_uninterrupted_run(shards, tmp_path):
    files, tok_dir = shards
    cfg, source = small_cfg(), DocSource(tuple(files))
    full = train(cfg, FineWebTask(cfg, tok_dir, source, val_docs=VAL_DOCS), str(tmp_path / "full"), device="cpu", quiet=True)
    run = str(tmp_path / "crashed")
    with pytest.raises(Crash):
        train(cfg, CrashingFineWeb(cfg, tok_dir, source, val_docs=VAL_DOCS), run, device="cpu", quiet=True)
    assert load_checkpoint(run)["task_state"][0]["step"] == 4  # rank 0's stream position, saved at step 4
    resumed = train(cfg, FineWebTask(cfg, tok_dir, source, val_docs=VAL_DOCS), run, device="cpu", resume=True, quiet=True)
    assert len(resumed["history"]) == len(full["history"])
    for a, b in zip(resumed["history"], full["history"]):
        assert_dicts_close(a, b)
    # and the model learns from the stream: validation loss falls from ~ln(320)
    assert full["history"][-1]["val_loss"] < full["history"][0]["val_loss"] - 0.3


def test_schema_and_source_errors_are_one_line(shards, tmp_path, monkeypatch):
    files, tok_dir = shards
    other = write_jsonl(tmp_path / "content.jsonl", rows(documents(30), field="content"))
    with pytest.raises(ValueError) as e:
        FineWebTask(small_cfg(), tok_dir, DocSource((other,)), val_docs=VAL_DOCS)
    assert "\n" not in str(e.value) and "--text-field" in str(e.value)
    task = FineWebTask(small_cfg(), tok_dir, DocSource((other,), text_field="content"), val_docs=VAL_DOCS)
    assert task.get_rank_batch(0, 2, 0, 1)[0].shape == (2, 16)
    with pytest.raises(ValueError, match="only 30 documents"):
        FineWebTask(small_cfg(), tok_dir, DocSource((other,), text_field="content"), val_docs=40)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DocSource((str(tmp_path / "missing.jsonl"),)).dataset()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="offline.*--data-files"):
        DocSource().dataset()


def test_parquet_shards_and_the_tokenizer_script(shards, tmp_path, repo_root):
    import datasets

    parquet = str(tmp_path / "000_00000.parquet")
    datasets.Dataset.from_list(rows(documents(40))).to_parquet(parquet)
    out = tmp_path / "tok32"
    r = subprocess.run([sys.executable, os.path.join(repo_root, "train_tinystories_tokenizer.py"), "--dataset",
                        "fineweb-edu", "--data-files", parquet, "--vocab-size", "300", "--out-dir", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "round-trip exact" in r.stdout and os.path.exists(out / "tokenizer.json")
    task = FineWebTask(small_cfg(vocab_size=300), str(out), DocSource((parquet,)), val_docs=VAL_DOCS)
    assert task.tok.get_vocab_size() == 300
    x, y = task.get_rank_batch(0, 2, 0, 1)
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])


def test_every_task_keeps_the_one_contract(tmp_path):
    """Each registered task has what tasks.Task asks for, and codec_for() rebuilds a codec from
    the identity its checkpoints store that encodes text the way its training batches begin."""
    from bitnet import tasks
    assert {"arithmetic", "tinystories", "fineweb-edu", "text"} <= set(tasks.TASKS)
    members = [n for n in vars(tasks.Task) if not n.startswith("_")] + list(tasks.Task.__annotations__)
    for name, task in tasks.TASKS.items():
        if name != "text":  # a folder made elsewhere is read, never trained: it has a codec only
            assert [m for m in members if not hasattr(task, m)] == [], name
    tok_dir, files = str(tmp_path / "tok"), [write_jsonl(tmp_path / "a.jsonl", rows(documents(40)))]
    save_tokenizer(train_bpe(documents(40), 300, show_progress=False), tok_dir)
    cfg = BitNetConfigTiny().with_overrides(["vocab_size=300", "max_position_embeddings=16"])
    task = FineWebTask(cfg, tok_dir, DocSource(tuple(files)), val_docs=VAL_DOCS)
    codec = tasks.codec_for(task.identity())
    x, _ = task.get_rank_batch(0, 1, 0, 1)  # the training stream: <|endoftext|> before every document
    assert x[0, 0] == task.eot and codec.encode("the")[0] == task.eot  # prompts begin as documents do
    assert codec.decode(codec.encode("the cell")) == "the cell" and codec.kind == "text"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.codec_for({"task": "nope"})
