"""Step 3 of the seed end to end, offline, on local FineWeb-Edu shards that the test writes:
the tokenizer, a --twin run that ends in a verdict, then generate, evaluate --text and export
on what the run wrote, and the export loaded by transformers."""
import json
import os
import random
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the a cell energy light plant water history river empire trade function number proof students "
         "learn science method data value change system earth heat is of and in to which was".split())
TINY = ["--set", "vocab_size=300", "--set", "hidden_size=32", "--set", "intermediate_size=64",
        "--set", "num_hidden_layers=1", "--set", "num_attention_heads=2", "--set", "num_key_value_heads=2",
        "--set", "max_position_embeddings=32", "--set", "batch_size=4", "--set", "warmup_steps=2",
        "--set", "eval_interval=6", "--set", "eval_tokens=256", "--set", "sample_tokens=4", "--set", "compile=false"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def shards(folder, n_files: int = 2, docs_per_file: int = 150) -> list[str]:
    """jsonl files in the dataset's schema: a `text` field per row, among its other fields."""
    rng, paths = random.Random(0), []
    for f in range(n_files):
        path = folder / f"train-{f:05d}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for i in range(docs_per_file):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "."
                out.write(json.dumps({"text": text, "id": f"<urn:uuid:{f}-{i}>", "score": 3.1, "int_score": 3}) + "\n")
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def step3(tmp_path_factory):
    """(the data files, the tokenizer folder, the twin run's OUT), built as a user would."""
    root = tmp_path_factory.mktemp("fineweb")
    files = shards(root)
    tok = run(["train_tinystories_tokenizer.py", "--dataset", "fineweb-edu", "--data-files", *files,
               "--vocab-size", "300", "--out-dir", str(root / "tok")])
    assert tok.returncode == 0, tok.stderr[-2000:]
    out = root / "run"
    train = run(["train_bitnet_tiny.py", "--dataset", "fineweb-edu", "--data-files", *files, "--val-docs", "20",
                 "--tokenizer", str(root / "tok"), "--out-dir", str(out), "--twin", "--max-steps", "12",
                 "--device", "cpu", *TINY])
    assert train.returncode == 0, train.stderr[-3000:]
    return files, root / "tok", out, train


def test_a_fineweb_twin_run_ends_in_a_verdict(step3):
    _, _, out, train = step3
    verdict = json.loads((out / "verdict.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert verdict["verdict"] in ("OK", "INCONCLUSIVE", "BROKEN") and summary["verdict"] == verdict["verdict"]
    assert not [p for p, ok in verdict["evidence"]["probes"].items() if not ok]  # a correct stack: no probe fails
    assert summary["ternary"]["steps"] == summary["fp"]["steps"] == 12
    assert summary["ternary"]["experiment"] == "fineweb-edu" and "verdict:" in train.stdout
    assert "local file" in summary["ternary"]["data"]["train"]


def test_generate_and_evaluate_read_the_runs_checkpoints(step3, tmp_path):
    files, _, out, _ = step3
    gen = run(["-m", "bitnet.generate", "--checkpoint", str(out), "--prompt", "The history of",
               "--max-new-tokens", "5"])
    assert gen.returncode == 0, gen.stderr
    assert [ln.split("] ", 1)[1].startswith("The history of") for ln in gen.stdout.strip().splitlines()] == [True, True]
    # evaluate --text takes documents each followed by a line <|endoftext|>
    docs = [json.loads(line)["text"] for line in open(files[0], encoding="utf-8")][:20]
    (tmp_path / "valid.txt").write_text("".join(f"{d}\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    ev = run(["-m", "bitnet.evaluate", "--checkpoint", str(out), "--text", str(tmp_path / "valid.txt"),
              "--max-tokens", "200"])
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    for r in (result, result["fp"]):  # ternary, and the twin under "fp"
        assert 0 < r["n_tokens"] <= 200 and 0 < r["val_loss"] < 2 * torch.log(torch.tensor(300.0)).item()
    from bitnet.evaluate import evaluate_run
    asked = Namespace(checkpoint=str(out / "ternary"), arithmetic=files[0], text=None, device="cpu", kernel="auto")
    with pytest.raises(ValueError, match="is a fineweb-edu run \\(use --text\\)"):  # bitnet.cli.run_main: one line
        evaluate_run(str(out / "ternary"), asked)


def test_export_loads_in_transformers_and_matches_our_model(step3, tmp_path, no_compile):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers loads BitNet quantization configs only with accelerate")
    from bitnet.checkpoint import load_checkpoint, model_from_checkpoint
    _, _, out, _ = step3
    ex = run(["-m", "bitnet.export", "--checkpoint", str(out / "ternary"), "--out", str(tmp_path / "hf")])
    assert ex.returncode == 0, ex.stderr
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = model_from_checkpoint(load_checkpoint(str(out / "ternary"))).eval()
    ids = torch.tensor([tok("The history of the river").input_ids])
    assert ids[0, 0] == tok.convert_tokens_to_ids("<|endoftext|>")  # as training began every document
    with torch.no_grad():
        assert (ours(ids)[0] - theirs(ids).logits).abs().max() < 1e-4
        generated = theirs.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids.shape[1] and torch.equal(generated[:, :ids.shape[1]], ids)
