"""The model: architecture against transformers' BitNetForCausalLM (an oracle nobody here
wrote), registered norms with gradients, no modules built in forward(), causality,
generate(), and the preset sizes."""
import pytest
import torch

from bitnet.bitlinear import BitLinear
from bitnet.model import BitNetForCausalLM, BitNetRMSNorm
from bitnet.build import build_model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize(model: torch.nn.Module, seed: int = 0):
    """Move every parameter away from its init (norm gains too), so a miswired or unused
    parameter shows up in the logits."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def random_ids(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 32, (b, t), generator=gen(seed))


# ---------------------------------------------------------------- oracle: transformers' model
@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    if not hasattr(transformers, "BitNetForCausalLM"):
        pytest.skip("the installed transformers has no BitNetForCausalLM")
    return transformers


def hf_model(hf, cfg, ternary: bool):
    hcfg = hf.BitNetConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        hidden_act="relu2", tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hcfg._attn_implementation = "sdpa"
    model = hf.BitNetForCausalLM(hcfg)
    if ternary:  # every nn.Linear except lm_head becomes an online-quantizing AutoBitLinear
        from transformers.integrations.bitnet import AutoBitLinear
        for name, mod in list(model.model.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                model.model.set_submodule(name, AutoBitLinear(mod.in_features, mod.out_features, bias=False,
                                                              online_quant=True))
    return model.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_full_precision_model_matches_transformers(hf, tiny_model_cfg, tie):
    cfg = tiny_model_cfg(quant="none", tie_word_embeddings=tie)
    ours = randomize(BitNetForCausalLM(cfg)).eval()
    theirs = hf_model(hf, cfg, ternary=False)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes
    ids = random_ids(3, 20, seed=1)
    with torch.no_grad():
        a, _ = ours(ids)
        b = theirs(ids).logits
    assert a.abs().max() > 1.0  # the comparison is not between near-zero numbers
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item()), (a - b).abs().max()


def test_ternary_model_matches_transformers_autobitlinear(hf, tiny_model_cfg, no_compile):
    cfg = tiny_model_cfg(quant="ternary")
    ours = randomize(BitNetForCausalLM(cfg)).eval()
    assert sum(isinstance(m, BitLinear) for m in ours.modules()) == 7 * cfg.num_hidden_layers
    theirs = hf_model(hf, cfg, ternary=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    fp = hf_model(hf, cfg, ternary=False)
    fp.load_state_dict(ours.state_dict(), strict=True)
    ids = random_ids(3, 20, seed=2)
    with torch.no_grad():
        a, _ = ours(ids)
        b = theirs(ids).logits
        c = fp(ids).logits
    tol = 1e-4 * a.abs().max().item()
    assert torch.allclose(a, b, rtol=1e-4, atol=tol), (a - b).abs().max()
    assert (a - c).abs().max() > 100 * tol  # quantization really changes the logits


# ---------------------------------------------------------------- norms and modules
@pytest.mark.parametrize("quant", ["ternary", "none"])
def test_every_norm_is_registered_and_gets_a_gradient(tiny_model_cfg, quant):
    cfg = tiny_model_cfg(quant=quant)
    model = randomize(BitNetForCausalLM(cfg))
    norms = {name: m for name, m in model.named_modules() if isinstance(m, BitNetRMSNorm)}
    L = cfg.num_hidden_layers
    expected = {"model.norm"} | {f"model.layers.{i}.{n}" for i in range(L) for n in (
        "input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm", "mlp.ffn_sub_norm")}
    assert set(norms) == expected
    params = dict(model.named_parameters())
    for name, norm in norms.items():
        assert params.get(f"{name}.weight") is norm.weight, f"{name}.weight is not a registered parameter"
    _, loss = model(random_ids(2, 12, seed=3), random_ids(2, 12, seed=4))
    loss.backward()
    for name, norm in norms.items():
        assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0, f"{name} gets no gradient"
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def modules_called_outside(model, fn) -> list[str]:
    """Run fn() with a global forward hook; return the modules called that model does not own."""
    owned = {id(m) for m in model.modules()}
    strangers = []

    def hook(module, args, output):
        if id(module) not in owned:
            strangers.append(type(module).__name__)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        fn()
    finally:
        handle.remove()
    return strangers


@pytest.mark.parametrize("quant", ["ternary", "none"])
def test_no_module_is_created_in_forward(tiny_model_cfg, quant):
    model = BitNetForCausalLM(tiny_model_cfg(quant=quant))
    ids = random_ids(2, 10, seed=5)
    seen = []
    probe = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(m))

    def run():
        model(ids, ids)[1].backward()
        model.eval()
        model.generate(ids[:, :4], 3)

    try:
        assert modules_called_outside(model, run) == []
    finally:
        probe.remove()
    assert any(isinstance(m, BitNetRMSNorm) for m in seen)  # the hook really saw the model's calls


def test_module_and_norm_checks_catch_a_norm_built_in_forward(tiny_model_cfg):
    model = build_model(tiny_model_cfg(inject_bug="norm_in_forward"))
    ids = random_ids(2, 10, seed=5)
    assert "BitNetRMSNorm" in modules_called_outside(model, lambda: model(ids, ids)[1].backward())
    assert model.model.layers[0].mlp.ffn_sub_norm.weight.grad is None  # the registered norm is never used


# ---------------------------------------------------------------- causality
def leaks_future(model, T: int = 16, trials: int = 3) -> bool:
    model.eval()
    with torch.no_grad():
        for trial in range(trials):
            ids = random_ids(2, T, seed=10 + trial)
            base, _ = model(ids)
            for t in (1, T // 2, T - 1):
                alt = ids.clone()
                alt[:, t:] = (alt[:, t:] - 4 + 1 + trial) % 28 + 4  # every future token changes
                out, _ = model(alt)
                assert not torch.equal(out[:, t:], base[:, t:])  # the change is visible where allowed
                if not torch.allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6):
                    return True
    return False


@pytest.mark.parametrize("quant", ["ternary", "none"])
def test_causality(tiny_model_cfg, quant):
    model = randomize(BitNetForCausalLM(tiny_model_cfg(quant=quant)))
    assert not leaks_future(model)


def test_causality_check_catches_a_per_tensor_activation_scale(tiny_model_cfg):
    model = randomize(build_model(tiny_model_cfg(inject_bug="per_tensor_act")))
    assert leaks_future(model)


# ---------------------------------------------------------------- generate()
def test_greedy_generate_is_argmax_of_the_forward_pass(tiny_model_cfg):
    model = randomize(BitNetForCausalLM(tiny_model_cfg())).eval()
    prompt = random_ids(3, 5, seed=20)
    out = model.generate(prompt, 6)
    assert out.shape == (3, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        for k in range(5, 11):
            assert torch.equal(out[:, k], model(out[:, :k])[0][:, -1].argmax(-1))
    # top_k=1 sampling is greedy whatever the temperature
    assert torch.equal(model.generate(prompt, 6, temperature=2.0, top_k=1, generator=gen(0)), out)


def test_sampling_is_reproducible_and_respects_top_k(tiny_model_cfg):
    model = randomize(BitNetForCausalLM(tiny_model_cfg())).eval()
    prompt = random_ids(4, 3, seed=21)
    a = model.generate(prompt, 8, temperature=1.5, top_k=3, generator=gen(7))
    b = model.generate(prompt, 8, temperature=1.5, top_k=3, generator=gen(7))
    assert torch.equal(a, b)
    with torch.no_grad():
        for k in range(3, 11):
            top3 = model(a[:, :k])[0][:, -1].topk(3).indices
            assert (top3 == a[:, k:k + 1]).any(dim=1).all(), "a token outside the top 3 was sampled"
    wide = model.generate(prompt, 8, temperature=1.5, generator=gen(7))
    assert not torch.equal(wide, model.generate(prompt, 8))  # temperature sampling is not greedy


def test_generate_stops_at_the_stop_token(tiny_model_cfg):
    torch.manual_seed(0)  # the init draws from the global RNG, whose state depends on the tests before
    model = BitNetForCausalLM(tiny_model_cfg()).eval()
    prompt = random_ids(2, 4, seed=22)
    free = model.generate(prompt, 6)
    row0 = free[0, 4:].tolist()
    # a token that row 0 first generates after its first step (the init is random: pick, don't assume)
    k = next((i for i in range(1, len(row0)) if row0[i] not in row0[:i]), 0)
    stop = row0[k]
    out = model.generate(prompt, 6, stop_token=stop)
    assert torch.equal(out[0, :5 + k], free[0, :5 + k])
    stopped = (out[:, 4:] == stop).any(dim=1)
    first = (out[:, 4:] == stop).int().argmax(dim=1) + 4
    for row in range(2):
        if stopped[row]:
            assert (out[row, first[row]:] == stop).all()  # after its stop token a row keeps emitting it
            assert torch.equal(out[row, :first[row]], free[row, :first[row]])  # and before it, greedy
    # generation ends as soon as every row has stopped, else after max_new_tokens
    assert out.shape[1] == (int(first.max()) + 1 if stopped.all() else 10)


def test_generate_keeps_to_the_context_window(tiny_model_cfg):
    model = BitNetForCausalLM(tiny_model_cfg(max_position_embeddings=8)).eval()
    out = model.generate(random_ids(1, 6, seed=23), 10)  # grows past the window: crops, no error
    assert out.shape == (1, 16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(random_ids(1, 9, seed=24))


# ---------------------------------------------------------------- configuration
def test_bad_quant_is_a_clear_error(tiny_model_cfg):
    with pytest.raises(ValueError, match="quant"):
        BitNetForCausalLM(tiny_model_cfg(quant="binary"))


@pytest.mark.parametrize("preset,low,high", [("BitNetConfigArithmetic", 4.5e6, 5.5e6),
                                             ("BitNetConfigTiny", 11e6, 13e6)])
def test_preset_sizes_match_their_names(preset, low, high):
    from bitnet import config_tiny
    cfg = getattr(config_tiny, preset)()
    with torch.device("meta"):  # shapes only: no memory, no init time
        n = BitNetForCausalLM(cfg).num_parameters()
    assert low < n < high, f"{preset}: {n / 1e6:.2f}M parameters"
