"""Export to transformers and back: the 2-bit layout against transformers' own pack/unpack,
from_pretrained logits and greedy generations against ours for the online and both packed
forms, the tokenizers, folders made elsewhere, our packed runtime, and the CLI."""
import json
import os
import sys
from dataclasses import asdict

import pytest
import torch

from bitnet import export as ex
from bitnet.bitlinear import weight_quant
from bitnet.config_tiny import BitNetConfigArithmetic
from bitnet.arithmetic_codec import CHARS, CharTokenizer
from bitnet.data_arithmetic import ArithmeticTask
from bitnet.model import BitNetForCausalLM
from bitnet.packing import PackedBitLinear, latent_from_ternary, pack_model, pack_ternary, unpack_ternary
from bitnet.checkpoint import save_checkpoint
from bitnet.errors import TrainingError
from bitnet.trainer import train
from test_model import random_ids, randomize

TOK = CharTokenizer()
FORMS = [("online", False, "autobitlinear"), ("packed", True, "autobitlinear"), ("packed-bitlinear", True, "bitlinear")]


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="transformers loads BitNet quantization configs only with accelerate")
    return transformers


def ternary(shape, seed):
    return torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(seed)).to(torch.int8)


def arith_model(tie=False, quant="ternary"):
    cfg = BitNetConfigArithmetic(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=24, dtype="fp32",
                                 tie_word_embeddings=tie, quant=quant, rope_theta=5000.0)  # not a default
    return randomize(BitNetForCausalLM(cfg)).eval()


def save_run(model, out_dir, task=None, step=7) -> str:
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "config": asdict(model.config),
                     "config_class": type(model.config).__name__,
                     "task": task or {"task": "arithmetic", "tokenizer": TOK.identity}, "step": step,
                     "history": [{"step": step, "val_loss": 1.5}]}, os.path.join(out_dir, "ckpt.pt"),
                    keep_previous=False)
    return str(out_dir)


def until_stop(rows: torch.Tensor, start: int, stop: int) -> list[list[int]]:
    """Each row's generated tokens up to and including the first stop token."""
    result = []
    for row in rows[:, start:].tolist():
        result.append(row[:row.index(stop) + 1] if stop in row else row)
    return result


# ---------------------------------------------------------------- the 2-bit layout
def test_packing_matches_transformers_pack_and_unpack(hf, no_compile):
    from transformers.integrations.bitnet import pack_weights, unpack_weights
    q = ternary((64, 24), seed=0)
    ours = pack_ternary(q)
    assert ours.shape == (16, 24) and ours.dtype == torch.uint8
    assert torch.equal(ours, pack_weights(q.clone().float()))  # pack_weights changes its argument
    assert torch.equal(unpack_weights(ours, dtype=torch.float32), q.float())
    assert torch.equal(unpack_ternary(ours), q)
    # the layout is four row blocks, not four neighbouring rows: row 16 sits in byte row 0, bits 2-3
    one = torch.zeros(64, 1, dtype=torch.int8)
    one[16] = 1
    assert pack_ternary(one)[0, 0] == 0b01_01_10_01  # codes (+1 -> 2) in bits 2-3, zeros (-> 1) elsewhere


def test_packing_pads_rows_and_rejects_a_foreign_code():
    q = ternary((10, 5), seed=1)  # 10 rows: padded to 12
    packed = pack_ternary(q)
    assert packed.shape == (3, 5)
    assert torch.equal(unpack_ternary(packed, 10), q)
    with pytest.raises(ValueError, match="code 3"):
        unpack_ternary(torch.full((3, 5), 0xFF, dtype=torch.uint8), 10)


def test_latent_from_ternary_quantizes_back_to_the_same_weights():
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(2))
    mean_abs = w.abs().mean()
    q = (w / mean_abs).round().clamp(-1, 1)
    latent = latent_from_ternary(q, mean_abs)
    assert torch.allclose(weight_quant(latent), q * mean_abs, rtol=1e-6, atol=0)
    assert not torch.allclose(weight_quant(q * mean_abs), q * mean_abs, rtol=1e-2)  # the naive latent shrinks


# ---------------------------------------------------------------- export -> from_pretrained
@pytest.mark.parametrize("name,packed,linear_class", FORMS)
def test_export_loads_in_transformers_with_matching_logits_and_generations(hf, no_compile, tmp_path, name, packed,
                                                                           linear_class):
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear
    ours = arith_model(tie=name == "packed")
    out = ex.export(save_run(ours, tmp_path / "run"), str(tmp_path / "hf"), packed=packed, linear_class=linear_class)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", ex.SIDECAR} <= set(os.listdir(out))
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == ours.config.rope_theta
    theirs = hf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "BitNetForCausalLM"
    layer = theirs.model.layers[1].mlp.down_proj
    assert isinstance(layer, BitLinear if linear_class == "bitlinear" else AutoBitLinear)
    if isinstance(layer, AutoBitLinear):
        assert layer.online_quant == (not packed)
    ids = random_ids(3, 20, seed=1)
    with torch.no_grad():
        a, _ = ours(ids)
        b = theirs(ids).logits
        # the packed forms against our own packed runtime on the same 2-bit weights, with the kernel
        # whose arithmetic order matches the transformers layer ("unpack" ~ AutoBitLinear, "int8" ~
        # BitLinear). Against the latent model a last-bit difference can flip one activation's int8
        # rounding and move logits by ~1e-2; the generations below compare with the latent model.
        kernel = "int8" if linear_class == "bitlinear" else "unpack"
        c = ex.packed_model_from_checkpoint(ex.load_hf_bitnet_dir(out, latent=False), kernel)(ids)[0] if packed else a
    assert a.abs().max() > 1.0
    assert (c - b).abs().max() <= (1e-3 if packed else 1e-4)
    # 20 greedy generations, each up to its stop token (our generate stops on newline, as does theirs)
    prompts = random_ids(20, 6, seed=3)
    want = until_stop(ours.generate(prompts, 10, stop_token=TOK.newline_id), 6, TOK.newline_id)
    got = until_stop(theirs.generate(prompts, max_new_tokens=10, do_sample=False,
                                     attention_mask=torch.ones_like(prompts)), 6, TOK.newline_id)
    assert got == want
    assert len({tuple(r) for r in want}) > 5  # the prompts really lead to different generations


def test_packed_linear_weights_take_a_sixteenth_of_fp32(hf, tmp_path):
    from safetensors import safe_open
    ours = arith_model()
    out = ex.export(save_run(ours, tmp_path / "run"), str(tmp_path / "hf"), packed=True)
    linear = {n: m for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    fp32 = sum(4 * m.weight.numel() for m in linear.values())
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(f"{n}.{k}").numel() * f.get_tensor(f"{n}.{k}").element_size()
                     for n in linear for k in ("weight", "weight_scale"))
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.uint8
        scale = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
    assert stored <= fp32 / 15
    w = ours.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(scale, w.abs().mean().reshape(1), rtol=1e-6)  # mean|W|: AutoBitLinear multiplies by it


def test_our_packed_runtime_generates_what_the_latent_model_does(hf, tmp_path):
    ours = arith_model()
    ckpt = ex.load_hf_bitnet_dir(ex.export(save_run(ours, tmp_path / "run"), str(tmp_path / "hf"), packed=True))
    prompts = random_ids(20, 6, seed=4)
    want = ours.generate(prompts, 10)
    ids = random_ids(3, 20, seed=5)
    for kernel in ("unpack", "int8"):
        packed = ex.packed_model_from_checkpoint(ckpt, kernel)
        assert all(not isinstance(m, torch.nn.Linear) or n == "lm_head" for n, m in packed.named_modules()
                   if n.startswith("model.layers"))
        assert sum(isinstance(m, PackedBitLinear) for m in packed.modules()) == 14
        assert not any(p.dtype == torch.uint8 for p in packed.parameters())
        assert torch.equal(packed.generate(prompts, 10), want), kernel
        with torch.no_grad():
            assert (packed(ids)[0] - ours(ids)[0]).abs().max() < 1e-4
    # and the latent rebuilt from the 2 bits (what the probes see) quantizes to the same model
    rebuilt = ex.model_from_checkpoint(ckpt)
    assert torch.equal(rebuilt.generate(prompts, 10), want)
    with pytest.raises(ValueError, match="kernel"):
        pack_model(arith_model(), kernel="fast")


# ---------------------------------------------------------------- tokenizers
def test_arithmetic_tokenizer_is_a_fast_tokenizer_with_the_same_ids(hf, tmp_path):
    out = ex.export(save_run(arith_model(), tmp_path / "run"), str(tmp_path / "hf"))
    tok = hf.AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, hf.PreTrainedTokenizerFast)
    text = "".join(CHARS) + "12 + 7 = 19\n"
    assert tok(text).input_ids == TOK.encode(text)
    ids = TOK.encode("3 * 4 = 12\n") + [2, 0, 31]  # <eos>, <pad> and an unused <r> are not text
    assert tok.decode(ids, skip_special_tokens=True) == TOK.decode(ids) == "3 * 4 = 12\n"
    cfg = json.load(open(os.path.join(out, "generation_config.json")))
    assert cfg["eos_token_id"] == TOK.newline_id and cfg["do_sample"] is False


def test_tinystories_tokenizer_exports_with_its_leading_endoftext(hf, tmp_path):
    from bitnet.text_tokenizer import train_bpe
    from bitnet.data_tinystories import EOT
    from bitnet.tasks import codec_for
    bpe = train_bpe(["Once upon a time there was a cat.", "The dog ran to the park and the cat ran."] * 20,
                    vocab_size=300, show_progress=False)
    identity = {"task": "tinystories", "tokenizer": bpe.to_str()}
    cfg = BitNetConfigArithmetic(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, dtype="fp32")
    out = ex.export(save_run(BitNetForCausalLM(cfg), tmp_path / "run", task=identity), str(tmp_path / "hf"))
    tok = hf.AutoTokenizer.from_pretrained(out)
    codec = codec_for(identity)
    assert tok("Once upon a cat").input_ids == codec.encode("Once upon a cat")
    assert tok("Once upon a cat").input_ids[0] == bpe.token_to_id(EOT)
    # the folder comes back with the training tokenizer (no doubled <|endoftext|>)
    back = ex.load_hf_bitnet_dir(out)
    assert back["task"] == identity and codec_for(back["task"]).encode("a cat") == codec.encode("a cat")
    # without our sidecar it is a plain text model whose tokenizer.json adds the <|endoftext|> itself
    os.remove(os.path.join(out, ex.SIDECAR))
    foreign = ex.load_hf_bitnet_dir(out)
    assert foreign["task"]["task"] == "text" and foreign["task"]["eos_token_id"] == bpe.token_to_id(EOT)
    text_codec = codec_for(foreign["task"])
    assert text_codec.encode("Once upon a cat") == codec.encode("Once upon a cat")
    assert text_codec.decode(codec.encode("the dog ran")) == "the dog ran"


def test_a_task_of_ones_own_needs_only_register(hf, tmp_path):
    """A new task registers its codec once; export and the tools then read its checkpoints
    without knowing its name (nothing in generate, evaluate or export names a task)."""
    from bitnet import tasks
    from bitnet.text_tokenizer import train_bpe
    from bitnet.generate import load_for_inference
    bpe = train_bpe(["the cat sat on the mat.", "a dog ran far."] * 20, vocab_size=290, show_progress=False)
    identity = {"task": "my-task", "tokenizer": bpe.to_str()}
    cfg = BitNetConfigArithmetic(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, dtype="fp32")
    run = save_run(BitNetForCausalLM(cfg), tmp_path / "run", task=identity)
    with pytest.raises(ValueError, match="unknown task 'my-task'.*bitnet.tasks.register"):
        ex.export(run, str(tmp_path / "refused"))

    class MyTask:
        name = "my-task"

        @staticmethod
        def codec(identity):
            return tasks.TextCodec(tasks.codec_for({**identity, "task": "text"}).tokenizer, stop_id=None,
                                   max_new_tokens=7)
    tasks.register(MyTask)
    try:
        out = ex.export(run, str(tmp_path / "hf"))
        model, codec, ckpt = load_for_inference(out)
        assert ckpt["task"] == identity and codec.max_new_tokens == 7
        assert hf.AutoTokenizer.from_pretrained(out)("the cat").input_ids == codec.encode("the cat")
    finally:
        tasks.TASKS.pop("my-task")


# ---------------------------------------------------------------- folders made elsewhere
@pytest.mark.parametrize("name,packed,linear_class", FORMS)
def test_a_folder_without_our_sidecar_loads_from_its_config(hf, no_compile, tmp_path, name, packed, linear_class):
    ours = arith_model(tie=True)
    out = ex.export(save_run(ours, tmp_path / "run"), str(tmp_path / "hf"), packed=packed, linear_class=linear_class)
    os.remove(os.path.join(out, ex.SIDECAR))  # as if written by someone else's tooling
    ckpt = ex.load_any_checkpoint(out)
    assert ckpt["task"] == {"task": "arithmetic", "tokenizer": TOK.identity}  # recognised by its vocabulary
    assert (ckpt["packed"] is not None) == packed
    model = ex.model_from_checkpoint(ckpt)
    assert model.config.tie_word_embeddings and model.config.quant == "ternary"
    ids = random_ids(2, 16, seed=6)
    theirs = hf.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (model(ids)[0] - theirs(ids).logits).abs().max() < 1e-4
    from bitnet.tasks import codec_for
    assert codec_for(ckpt["task"]).encode("1 + 2 =") == TOK.encode("1 + 2 =")


def test_full_precision_twin_exports_without_quantization(hf, tmp_path):
    ours = arith_model(quant="none")
    out = ex.export(save_run(ours, tmp_path / "run"), str(tmp_path / "hf"))
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    theirs = hf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs.model.layers[0].mlp.up_proj) is torch.nn.Linear
    ids = random_ids(2, 16, seed=7)
    with torch.no_grad():
        assert (ours(ids)[0] - theirs(ids).logits).abs().max() < 1e-4
    with pytest.raises(ValueError, match="--packed needs a ternary run"):
        ex.export(str(tmp_path / "run"), str(tmp_path / "hf2"), packed=True)


def test_bad_inputs_are_clear_errors(hf, tmp_path):
    run = save_run(arith_model(), tmp_path / "run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an earlier export"):
        ex.export(run, str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "notes.txt").exists()
    with pytest.raises(ValueError, match="needs --packed"):
        ex.export(run, str(tmp_path / "x"), linear_class="bitlinear")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(TrainingError, match="model_type 'llama'"):
        ex.load_any_checkpoint(str(llama))
    odd = BitNetConfigArithmetic(hidden_size=30, intermediate_size=62, num_hidden_layers=1, num_attention_heads=3,
                                 num_key_value_heads=3, dtype="fp32")
    with pytest.raises(ValueError, match="divisible by 4"):
        ex.export(save_run(BitNetForCausalLM(odd), tmp_path / "odd"), str(tmp_path / "y"), packed=True)


# ---------------------------------------------------------------- a model that learned '+'
@pytest.fixture(scope="module")
def plus_run(arith_cfg, tmp_path_factory):
    """'+' with operands 0-12 and no held-out share: a 1-layer model learns it in ~12 s."""
    cfg = arith_cfg(operators="+", add_max=12, heldout_fraction=0.0, max_steps=400, eval_interval=400,
                    batch_size=64, eval_problems=100)
    out = str(tmp_path_factory.mktemp("plus"))
    r = train(cfg, ArithmeticTask(cfg), out, device="cpu", quiet=True)
    assert r["final"]["indist_acc"] > 0.9, r["final"]
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_the_arithmetic_export_answers_through_transformers_generate(hf, no_compile, plus_run, tmp_path, packed):
    out = ex.export(plus_run, str(tmp_path / "hf"), packed=packed)
    model = hf.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = hf.AutoTokenizer.from_pretrained(out)
    enc = tok("12 + 7 =", return_tensors="pt")
    gen = model.generate(**enc)  # generation_config.json: greedy, stops at the newline
    assert tok.decode(gen[0, enc.input_ids.shape[1]:], skip_special_tokens=True) == " 19\n"


def test_cli_export_then_generate_evaluate_on_the_folder(hf, plus_run, tmp_path, monkeypatch, capsys):
    """In-process through cli.run_main, as `python -m bitnet.X` runs them (a subprocess each would
    spend most of its time importing transformers)."""
    from bitnet import evaluate, generate
    from bitnet.errors import run_main
    out = tmp_path / "hf"

    def run(module, *args):
        monkeypatch.setattr(sys, "argv", [module.__name__, *args])
        run_main(module.main)
        return capsys.readouterr()

    assert "packed 2-bit" in run(ex, "--checkpoint", plus_run, "--out", str(out), "--packed").out
    assert run(generate, "--checkpoint", str(out), "--prompt", "12 + 7 =").out.strip() == "12 + 7 = 19"
    problems = tmp_path / "p.txt"
    problems.write_text("12 + 7 = 19\n3 + 4 = 7\n9 + 9 = 18\n")
    for kernel in ("unpack", "latent"):
        result = json.loads(run(evaluate, "--checkpoint", str(out), "--arithmetic", str(problems),
                                "--kernel", kernel).out.strip().splitlines()[-1])
        assert result["n"] == 3 and result["per_op"]["+"] >= 2 / 3 and result["per_op"]["-"] is None
    from bitnet import diagnose
    for folder, flags in ((tmp_path / "hf-online", []), (out, [])):  # the diagnosis on exported folders
        if folder != out:
            run(ex, "--checkpoint", plus_run, "--out", str(folder), *flags)
        monkeypatch.setattr(sys, "argv", ["bitnet.diagnose", "--checkpoint", str(folder)])
        verdict = diagnose.diagnose_checkpoint(str(folder))
        printed = capsys.readouterr().out
        assert verdict["verdict"] == "OK" and not verdict["failed_checks"], printed[-1500:]
        assert "weights_ternary" in printed and "ste_gradients" in printed  # the layer probes ran on it
    with pytest.raises(SystemExit) as stop:
        run(ex, "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "z"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "no checkpoint" in err
