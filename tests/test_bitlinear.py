"""BitLinear and its quantizers, checked against independent reference code, theory,
and transformers' own BitNet quantizers (an implementation nobody here wrote).

Several checks are also run on the known-bad variants that bitnet/diagnose/bugs.py injects
(`--inject-bug`), to show that each check fails when the behaviour it guards is broken.
"""
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitnet.bitlinear import BitLinear, activation_quant, default_linear_cls, weight_quant
from bitnet.diagnose import effective_weight
from bitnet.bugs import BUGS


def make_layer(in_features: int, out_features: int, bug: str | None = None) -> BitLinear:
    """Our BitLinear, or the injected bug's BitLinear subclass."""
    return (BUGS[bug].cls if bug else BitLinear)(in_features, out_features)

# P(|z| < 0.5 * E|z|) for z ~ N(0, 1): the share of zeros after absmean ternary rounding.
P_ZERO = math.erf(0.5 * math.sqrt(2 / math.pi) / math.sqrt(2))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- independent reference code
def ref_weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Ternary by thresholding (not by round()): +-mean|W| where |w| > mean|W|/2, else 0."""
    m = np.abs(w.detach().numpy().astype(np.float64)).mean()
    wn = w.detach().numpy().astype(np.float64)
    out = np.where(np.abs(wn) > 0.5 * m, np.sign(wn) * m, 0.0)
    return torch.from_numpy(out).float()


def ref_act_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-row int8 absmax, one row at a time in numpy."""
    rows = x.detach().reshape(-1, x.shape[-1]).numpy()
    out = np.empty_like(rows)
    for i, r in enumerate(rows):
        s = np.float32(127.0) / max(np.float32(np.abs(r).max()), np.float32(1e-5))
        out[i] = np.clip(np.round(r * s), -128, 127) / s
    return torch.from_numpy(out).reshape(x.shape)


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize("shape,std", [((64, 48), 0.02), ((16, 16), 3.0), ((1, 300), 1.0), ((128, 32), 1e-3)])
def test_weight_quant_values_are_minus1_0_plus1_over_s(shape, std):
    w = torch.randn(shape, generator=gen(0)) * std
    s = 1.0 / w.abs().mean()
    wq = weight_quant(w)
    assert wq.shape == w.shape and wq.dtype == w.dtype
    levels = wq * s
    assert torch.allclose(levels, levels.round(), atol=1e-5), "w_q * s is not an integer"
    assert set(levels.round().unique().tolist()) == {-1.0, 0.0, 1.0}
    # exactly the three values {-1, 0, +1} / s (to fp32 rounding of 1/s)
    expected = torch.tensor([-1.0, 0.0, 1.0]) / s
    assert torch.allclose(wq.unique(), expected, rtol=1e-6, atol=0)
    # and each weight goes to the right one (independent threshold formulation)
    assert torch.allclose(wq, ref_weight_quant(w), rtol=1e-5, atol=0)


def test_weight_quant_zero_fraction_matches_gaussian_theory():
    assert 0.30 < P_ZERO < 0.32  # "about 31% zeros"
    w = torch.randn(1024, 1024, generator=gen(1)) * 0.02
    zeros = (weight_quant(w) == 0).float().mean().item()
    # 1M samples: the standard error is ~0.0005
    assert abs(zeros - P_ZERO) < 0.003, f"{zeros:.4f} zeros, theory {P_ZERO:.4f}"


def test_weight_quant_is_scale_equivariant():
    w = torch.randn(32, 32, generator=gen(2))
    for c in (1e-3, 7.0):
        assert torch.allclose(weight_quant(w * c), weight_quant(w) * c, rtol=1e-5)


@pytest.mark.parametrize("bug", ["binary_weights", "wrong_scale", "no_rescale"])
def test_weight_value_check_catches_bad_variants(bug):
    layer = make_layer(48, 64, bug)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 48, generator=gen(0)) * 0.02)
    assert not torch.allclose(effective_weight(layer), ref_weight_quant(layer.weight), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- activations
def test_activation_quant_lies_on_the_per_token_int8_grid():
    x = torch.randn(3, 5, 40, generator=gen(3)) * torch.logspace(-3, 2, 5)[None, :, None]
    xq = activation_quant(x)
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True)
    k = xq * s
    assert torch.allclose(k, k.round(), atol=1e-3), "x_q * s is not an integer"
    assert k.round().min() >= -128 and k.round().max() <= 127
    # the largest |x| of every token lands on +-127, so the whole int8 range is used per token
    assert torch.equal(k.abs().round().amax(dim=-1), torch.full((3, 5), 127.0))
    # and the values are the per-row reference ones
    assert torch.allclose(xq, ref_act_quant(x), rtol=1e-6, atol=0)
    # an all-zero token stays zero (no division by zero)
    assert torch.equal(activation_quant(torch.zeros(2, 8)), torch.zeros(2, 8))


def _rows_independent(fn) -> bool:
    """Change one token and one batch row; every other row's output must stay bit-identical."""
    x = torch.randn(3, 6, 32, generator=gen(4))
    x2 = x.clone()
    x2[1, 2] *= 50.0  # one token, much larger
    x2[2] = torch.randn(6, 32, generator=gen(5)) * 10  # one whole batch row
    y, y2 = fn(x), fn(x2)
    changed = torch.zeros(3, 6, dtype=torch.bool)
    changed[1, 2] = True
    changed[2] = True
    assert not torch.equal(y[changed], y2[changed]), "the changed rows should change"
    return torch.equal(y[~changed], y2[~changed])


def test_activation_quant_is_per_token():
    assert _rows_independent(activation_quant)


def test_bitlinear_output_is_per_token():
    layer = BitLinear(32, 16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 32, generator=gen(6)) * 0.1)
        assert _rows_independent(layer)


def test_per_token_check_catches_per_tensor_scale():
    layer = make_layer(32, 16, "per_tensor_act")
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 32, generator=gen(6)) * 0.1)
        assert not _rows_independent(layer)


# ---------------------------------------------------------------- straight-through estimator
def _ste_mismatches(bug=None) -> list[str]:
    """Forward y = x_q w_q^T, dL/dW = g^T x_q, dL/dx = g w_q, with x_q, w_q from reference code."""
    layer = make_layer(24, 16, bug)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 24, generator=gen(7)) * 0.1)
    x = torch.randn(4, 7, 24, generator=gen(8)).requires_grad_(True)
    y = layer(x)
    g = torch.randn(y.shape, generator=gen(9))
    y.backward(g)
    x_q, w_q = ref_act_quant(x), ref_weight_quant(layer.weight)
    want_y = x_q @ w_q.T
    want_gw = g.reshape(-1, 16).T @ x_q.reshape(-1, 24)
    want_gx = g @ w_q
    bad = []
    if not torch.allclose(y, want_y, rtol=1e-4, atol=1e-5):
        bad.append("forward")
    if layer.weight.grad is None or not torch.allclose(layer.weight.grad, want_gw, rtol=1e-4, atol=1e-5):
        bad.append("weight grad")
    if x.grad is None or not torch.allclose(x.grad, want_gx, rtol=1e-4, atol=1e-5):
        bad.append("input grad")
    if not bad:  # both gradients really flow
        assert want_gw.abs().sum() > 0 and want_gx.abs().sum() > 0
        assert layer.weight.grad.norm() > 0.1 * want_gw.norm() and x.grad.norm() > 0.1 * want_gx.norm()
    return bad


def test_bitlinear_forward_and_ste_gradients():
    assert _ste_mismatches() == []


@pytest.mark.parametrize("bug", ["no_ste", "quantize_output", "per_tensor_act", "no_rescale", "binary_weights"])
def test_ste_check_catches_bad_variants(bug):
    assert _ste_mismatches(bug) != []


def test_default_linear_cls_switch():
    assert default_linear_cls("ternary") is BitLinear
    plain = default_linear_cls("none")(8, 4)
    assert type(plain) is torch.nn.Linear and plain.bias is None
    assert BitLinear(8, 4).bias is None
    with pytest.raises(ValueError, match="quant"):
        default_linear_cls("binary")


# ---------------------------------------------------------------- variance at initialisation
def _bitlinear_over_linear_variance(bug=None) -> float:
    w = torch.randn(512, 1024, generator=gen(10)) * 0.02  # the model's init (initializer_range)
    x = torch.randn(64, 1024, generator=gen(11))
    layer = make_layer(1024, 512, bug)
    with torch.no_grad():
        layer.weight.copy_(w)
        return (layer(x).var() / F.linear(x, w).var()).item()


def test_bitlinear_output_variance_matches_theory():
    # E[w_q^2] / E[w^2] = (1 - p0) * (E|w|)^2 / sigma^2 = (1 - p0) * 2/pi for Gaussian weights
    theory = (1 - P_ZERO) * 2 / math.pi
    ratio = _bitlinear_over_linear_variance()
    assert 0.5 < math.sqrt(ratio) < 2.0, f"std ratio {math.sqrt(ratio):.3g} not within 2x of nn.Linear"
    assert abs(ratio - theory) < 0.03, f"variance ratio {ratio:.4f}, theory {theory:.4f}"


@pytest.mark.parametrize("bug", ["no_rescale", "wrong_scale", "binary_weights"])
def test_variance_check_catches_bad_variants(bug):
    theory = (1 - P_ZERO) * 2 / math.pi
    ratio = _bitlinear_over_linear_variance(bug)
    assert not (0.5 < math.sqrt(ratio) < 2.0 and abs(ratio - theory) < 0.03)


# ---------------------------------------------------------------- oracle: transformers' quantizers
@pytest.fixture(scope="module")
def hf_quant():
    bitnet_hf = pytest.importorskip("transformers.integrations.bitnet",
                                     reason="transformers with BitNet support is not installed")
    if not (hasattr(bitnet_hf, "WeightQuant") and hasattr(bitnet_hf, "ActQuant")):
        pytest.skip("the installed transformers has no WeightQuant/ActQuant in transformers.integrations.bitnet")
    return bitnet_hf


def test_quantizers_agree_with_transformers(hf_quant, no_compile):
    t0 = time.perf_counter()
    for seed, shape, std in [(0, (64, 48), 0.02), (1, (256, 256), 1.0), (2, (3, 5, 40), 30.0), (3, (7, 1), 1e-3)]:
        w = torch.randn(shape, generator=gen(seed)) * std
        theirs = hf_quant.WeightQuant.apply(w)
        assert torch.allclose(weight_quant(w), theirs, rtol=1e-6, atol=0), f"WeightQuant differs for {shape}"
        x = torch.randn(shape, generator=gen(seed + 100)) * std
        x[..., 0, :] = 0.0  # an all-zero token
        theirs = hf_quant.ActQuant.apply(x)
        assert torch.allclose(activation_quant(x), theirs, rtol=1e-6, atol=0), f"ActQuant differs for {shape}"
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"oracle comparison took {elapsed:.1f}s: was torch.compile really disabled?"


def test_bitlinear_agrees_with_transformers_autobitlinear(hf_quant, no_compile):
    ours = BitLinear(48, 24)
    theirs = hf_quant.AutoBitLinear(48, 24, bias=False, online_quant=True)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(24, 48, generator=gen(12)) * 0.05)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 9, 48, generator=gen(13))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), theirs(xb)
    assert torch.allclose(ya, yb, rtol=1e-5, atol=1e-6)
    g = torch.randn(ya.shape, generator=gen(14))
    ya.backward(g)
    yb.backward(g)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-6)
