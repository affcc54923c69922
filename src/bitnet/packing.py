"""Ternary weights in 2 bits: the packed form of a trained BitNet, and a layer that runs on it.

Layout (transformers' `integrations/bitnet.py`, checked against its pack_weights/unpack_weights):
a ternary matrix [out, in] becomes uint8 [out/4, in]. Values -1, 0, +1 are stored as the codes
0, 1, 2; byte row r holds weight rows r, r + out/4, r + 2*out/4, r + 3*out/4 in bits 0-1, 2-3,
4-5, 6-7. So rows are split into four blocks, not four neighbours: the block index is the bit pair.

Scale: a BitLinear weight is W_q = q * mean|W| with q ternary. `weight_scale` here is mean|W|,
the multiplier, as transformers' AutoBitLinear (offline) uses it: y = linear(x_q, q) * weight_scale.
transformers' BitLinear (linear_class "bitlinear", Microsoft's released checkpoints) stores the
reciprocal 1/mean|W| and divides by it; export.py converts at that boundary and nowhere else.

PackedBitLinear keeps only the packed bytes and the scale (1/16 of the fp32 weight). Its
forward quantizes the input to int8 per token exactly as BitLinear does, then either
  kernel="unpack": unpacks to float {-1, 0, 1} and runs a float matmul (what transformers does), or
  kernel="int8":   unpacks to int8 and runs an int8 x int8 -> int32 matmul (torch._int_mm).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .bitlinear import BitLinear, absmean_ternary, activation_quant

VALUES_PER_BYTE = 4
KERNELS = ("unpack", "int8")


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values in {-1, 0, 1} -> uint8 [ceil(out/4), in] (rows padded with zeros)."""
    out_features = q.shape[0]
    rows = -(-out_features // VALUES_PER_BYTE)
    codes = torch.ones((rows * VALUES_PER_BYTE, *q.shape[1:]), dtype=torch.uint8, device=q.device)  # code 1 = 0
    codes[:out_features] = (q.to(torch.int8) + 1).to(torch.uint8)
    packed = torch.zeros((rows, *q.shape[1:]), dtype=torch.uint8, device=q.device)
    for i in range(VALUES_PER_BYTE):
        packed |= codes[i * rows:(i + 1) * rows] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor, out_features: int | None = None, dtype=torch.int8,
                   check: bool = True) -> torch.Tensor:
    """Inverse of pack_ternary: uint8 [rows, in] -> [out_features, in] in {-1, 0, 1}.
    `check` rejects bytes holding the unused code 3 (a file of another layout); forward() skips it."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed ternary weights must be uint8, got {packed.dtype}")
    rows = packed.shape[0]
    codes = torch.empty((rows * VALUES_PER_BYTE, *packed.shape[1:]), dtype=torch.uint8, device=packed.device)
    for i in range(VALUES_PER_BYTE):  # written in place: ~15x faster than cat() of the four blocks
        torch.bitwise_and(packed >> (2 * i), 3, out=codes[i * rows:(i + 1) * rows])
    if out_features is not None:
        codes = codes[:out_features]
    if check and bool((codes == 3).any()):
        raise ValueError("packed weights hold the unused 2-bit code 3: not a ternary packing of this layout")
    q = codes.view(torch.int8).sub_(1)
    return q if dtype == torch.int8 else q.to(dtype)


def latent_from_ternary(q: torch.Tensor, mean_abs: torch.Tensor) -> torch.Tensor:
    """A full-precision weight W with weight_quant(W) == q * mean_abs, for code that needs a latent
    BitLinear (the diagnosis probes). q * mean_abs itself would not do: its own mean|.| is
    mean_abs * (share of non-zeros), so re-quantizing would shrink the scale by that share.
    Scaling by 1/share puts mean|W| back at mean_abs; every non-zero is then >= mean_abs in size,
    so it still rounds to +-1."""
    q = q.float()
    share = q.abs().mean().clamp(min=1e-12)
    return q * (mean_abs.float().reshape(()) / share)


class PackedBitLinear(nn.Module):
    """Inference-only BitLinear on 2-bit weights: buffers `weight` (uint8 [out/4, in]) and
    `weight_scale` ([1], mean|W|), the state-dict names transformers' packed checkpoints use."""

    def __init__(self, in_features: int, out_features: int, kernel: str = "unpack", device=None):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        rows = -(-out_features // VALUES_PER_BYTE)
        self.register_buffer("weight", torch.zeros((rows, in_features), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, device=device))

    @classmethod
    def from_linear(cls, layer: nn.Linear, kernel: str = "unpack") -> "PackedBitLinear":
        packed = cls(layer.in_features, layer.out_features, kernel, device=layer.weight.device)
        with torch.no_grad():
            q, scale = absmean_ternary(layer.weight.float())
            packed.weight.copy_(pack_ternary(q))
            packed.weight_scale.copy_((1.0 / scale).reshape(1))
        return packed

    def ternary(self, dtype=torch.int8) -> torch.Tensor:
        return unpack_ternary(self.weight, self.out_features, dtype, check=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "unpack":
            return F.linear(activation_quant(x), self.ternary(x.dtype)) * self.weight_scale.to(x.dtype)
        flat = x.reshape(-1, self.in_features).float()
        s = 127.0 / flat.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)  # as bitlinear.activation_quant
        x_int = (flat * s).round().clamp(-128, 127).to(torch.int8)
        acc = torch._int_mm(x_int, self.ternary().t())  # exact integer sums, int32
        # rescaled in the order of transformers' BitLinear (y / (s_x * 1/mean|W|)), so that its packed
        # form computes bit for bit what this does
        y = acc.float() / (s * (1.0 / self.weight_scale))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def pack_model(model: nn.Module, kernel: str = "unpack", empty: bool = False) -> nn.Module:
    """Replace every BitLinear by a PackedBitLinear, in place: packed from its weight, or, with
    `empty`, zero-filled for load_state_dict() to fill (no quantization work wasted)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BitLinear):
            if type(module) is not BitLinear:  # the self-test's bug layers subclass BitLinear
                raise ValueError(f"{name} is a {type(module).__name__}, not BitLinear (an --inject-bug run?); "
                                 "pack a model trained without --inject-bug")
            if empty:
                new = PackedBitLinear(module.in_features, module.out_features, kernel, device=module.weight.device)
            else:
                new = PackedBitLinear.from_linear(module, kernel)
            model.set_submodule(name, new)
    return model


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    for module in model.modules():
        if isinstance(module, PackedBitLinear):
            module.kernel = kernel
    return model


def unpacked_state_dict(state: dict, out_features: dict[str, int]) -> dict:
    """A latent-style state dict from a packed one ({name}.weight uint8 + {name}.weight_scale ->
    {name}.weight fp32 whose BitLinear quantization is the packed one). `out_features`: layer -> rows."""
    result = {}
    for key, value in state.items():
        if key.endswith(".weight_scale"):
            continue
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer in out_features and value.dtype == torch.uint8:
            q = unpack_ternary(value, out_features[layer])
            result[key] = latent_from_ternary(q, state[f"{layer}.weight_scale"])
        else:
            result[key] = value
    return result
