"""Models that leave the repo: a transformers `BitNetForCausalLM` folder, and back.

    python -m bitnet.export --checkpoint runs/arith --out exports/arith            # online form
    python -m bitnet.export --checkpoint runs/arith --out exports/arith-2bit --packed

The folder loads with `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` (loading a BitNet quantization config needs `accelerate`).
  online:  the latent fp32 weights; transformers' AutoBitLinear quantizes them in every forward,
           exactly as our BitLinear does (quantization_config autobitlinear/online).
  packed:  2-bit ternary weights, uint8 [out/4, in] + weight_scale (packing.py has the layout);
           autobitlinear/offline by default, or --linear-class bitlinear for the layout of
           Microsoft's released checkpoints (weight_scale = 1/mean|W|, weights stay packed in memory).
A full-precision twin (--quant none) exports as a plain BitNetForCausalLM without quantization.
bitnet_tiny.json beside them keeps what transformers has no field for: our config, the task
identity (tokenizer), the step and the evaluation history, so generate/evaluate/diagnose
treat the folder like the run it came from.

load_hf_bitnet_dir() reads such a folder, or any transformers BitNet folder (e.g. a user's
own, with any of the three quantization layouts), into a checkpoint-like dict.
"""
import argparse
import json
import os
import shutil
from dataclasses import asdict, replace

import torch

from .checkpoint import load_checkpoint, model_from_checkpoint
from .errors import TrainingError, run_main
from .model import BitNetDecoderLayer, BitNetForCausalLM
from .packing import pack_model, pack_ternary, unpacked_state_dict
from .rundir import fsync_dir, fsync_files, raise_if_disk_full, remove_stale_temps, write_json_atomic
from .tasks import codec_for, identity_of_tokenizer

SIDECAR = "bitnet_tiny.json"
SIDECAR_FORMAT = "bitnet-tiny-export-v1"
WEIGHTS = "model.safetensors"
LINEAR_CLASSES = ("autobitlinear", "bitlinear")


def is_hf_dir(path: str) -> bool:
    """A transformers model folder (config.json), as opposed to a run folder or ckpt.pt."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


# ---------------------------------------------------------------------------------- export
def quantization_config(quant: str, packed: bool, linear_class: str) -> dict | None:
    if quant == "none":
        return None
    mode = "offline" if packed else "online"
    if not packed and linear_class != "autobitlinear":
        raise ValueError("--linear-class bitlinear needs --packed (transformers' BitLinear only reads 2-bit weights)")
    return {"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": mode,
            "modules_to_not_convert": ["lm_head"], "use_rms_norm": False}


def hf_config(cfg, ids: dict, quant_config: dict | None):
    """transformers.BitNetConfig for our config; field names are shared (config_tiny.py)."""
    from transformers import BitNetConfig as HFBitNetConfig

    hcfg = HFBitNetConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        hidden_act="relu2", tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False,
        initializer_range=cfg.initializer_range, bos_token_id=ids["bos"], eos_token_id=ids["stop"],
        pad_token_id=ids["pad"])
    hcfg.architectures = ["BitNetForCausalLM"]
    hcfg.dtype = "float32"
    if quant_config is not None:
        hcfg.quantization_config = quant_config
    return hcfg


def export_state_dict(model: BitNetForCausalLM, packed: bool, linear_class: str) -> dict:
    """Tensors for model.safetensors: ours are named like transformers' already."""
    if packed:
        model = pack_model(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # safetensors stores no shared tensors; transformers re-ties it
    if packed and linear_class == "bitlinear":  # its BitLinear divides by weight_scale: store 1/mean|W|
        for k in [k for k in state if k.endswith(".weight_scale")]:
            state[k] = 1.0 / state[k]
    return state


def export(checkpoint: str, out_dir: str, packed: bool = False, linear_class: str = "autobitlinear") -> str:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    if linear_class not in LINEAR_CLASSES:
        raise ValueError(f"--linear-class must be one of {LINEAR_CLASSES}, got {linear_class!r}")
    ckpt = load_any_checkpoint(checkpoint)
    plugs = [k for k in ("linear_spec", "model_spec") if (ckpt.get("config") or {}).get(k)]
    if plugs:  # transformers' BitNetForCausalLM would run our BitLinear, not the user's layer or model
        raise TrainingError(f"{checkpoint} was trained with your own {' and '.join(p.split('_')[0] for p in plugs)} "
                            f"({', '.join(ckpt['config'][p] for p in plugs)}); the export writes our model with our "
                            f"BitLinear only, so export it with your own code")
    model = model_from_checkpoint(ckpt)
    cfg = model.config
    if cfg.inject_bug:
        raise ValueError(f"{checkpoint} was trained with --inject-bug {cfg.inject_bug}; export a run without it")
    if packed and cfg.quant != "ternary":
        raise ValueError(f"--packed needs a ternary run; {checkpoint} is full precision (quant={cfg.quant}): drop --packed")
    if packed:
        odd = [f"{n} ({m.out_features})" for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head" and m.out_features % 4]
        if odd:  # transformers' packed layers hold out_features/4 rows exactly
            raise ValueError(f"--packed needs every output size divisible by 4; not: {', '.join(odd[:3])}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, SIDECAR)):
            raise ValueError(f"{out_dir} exists and is not an earlier export; choose a new --out")
    # written whole into OUT.tmp.PID beside OUT, then renamed: no folder looks complete unless it is
    out_dir = out_dir.rstrip("/")
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = f"{out_dir}.tmp.{os.getpid()}"
    state = export_state_dict(model, packed, linear_class)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        remove_stale_temps(parent, only=os.path.basename(out_dir))  # those of killed exports
        ids = codec_for(ckpt.get("task") or {}).save_pretrained(tmp)  # tokenizer files; the ids config.json names
        qcfg = quantization_config(cfg.quant, packed, linear_class)
        hf_config(cfg, ids, qcfg).save_pretrained(tmp)
        config_path = os.path.join(tmp, "config.json")
        hf = _read_json(config_path)
        hf["rope_theta"] = cfg.rope_theta  # transformers 5 reads rope_parameters; bitnet.cpp's converter this key
        write_json_atomic(config_path, hf)
        GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["stop"], pad_token_id=ids["pad"],
                         do_sample=False, max_new_tokens=ids["max_new_tokens"]).save_pretrained(tmp)
        save_file(state, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        write_json_atomic(os.path.join(tmp, SIDECAR), {
            "format": SIDECAR_FORMAT, "source": os.path.abspath(checkpoint), "packed": packed,
            "linear_class": linear_class if qcfg else None, "config": asdict(cfg),
            "config_class": type(cfg).__name__, "task": ckpt.get("task") or {}, "step": ckpt.get("step", 0),
            "history": ckpt.get("history", [])})
        fsync_files(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)  # a complete folder or none
        fsync_dir(parent)
    except Exception as e:
        written = sum(os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp) if n != WEIGHTS) \
            if os.path.isdir(tmp) else 0  # tokenizer and config files
        shutil.rmtree(tmp, ignore_errors=True)  # first, so the free space reported is what there is
        raise_if_disk_full(e, "the export", out_dir, written + sum(v.numel() * v.element_size() for v in state.values()),
                           whole=True, then="nothing was exported (the checkpoint is untouched): free some space and export again")
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------------------------- import
def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_weights(path: str) -> dict:
    from safetensors.torch import load_file

    index = os.path.join(path, f"{WEIGHTS}.index.json")
    if os.path.isfile(index):  # sharded: model-00001-of-0000N.safetensors ...
        state = {}
        for shard in sorted(set(_read_json(index)["weight_map"].values())):
            state.update(load_file(os.path.join(path, shard)))
        return state
    if not os.path.isfile(os.path.join(path, WEIGHTS)):
        raise TrainingError(f"{path} has no {WEIGHTS}; only safetensors folders are read (no pickle)")
    return load_file(os.path.join(path, WEIGHTS))


def our_config_from_hf(hf: dict):
    """Our BitNetConfig for a transformers BitNet config.json; refuses what our model cannot be."""
    from .config_tiny import BitNetConfig

    if hf.get("model_type") != "bitnet":
        raise TrainingError(f"config.json has model_type {hf.get('model_type')!r}; only transformers BitNet folders are read")
    if hf.get("hidden_act", "relu2") != "relu2" or hf.get("attention_bias"):
        raise TrainingError(f"unsupported BitNet variant (hidden_act={hf.get('hidden_act')!r}, "
                            f"attention_bias={hf.get('attention_bias')}); our model has relu2 and no biases")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise TrainingError(f"rope type {rope.get('rope_type', rope.get('type'))!r} is not supported (default RoPE only)")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise TrainingError(f"head_dim {hf['head_dim']} != hidden_size/num_attention_heads; not supported")
    qc = hf.get("quantization_config")
    if qc and qc.get("use_rms_norm"):
        raise TrainingError("quantization_config.use_rms_norm=true (an extra norm in every layer) is not supported")
    return BitNetConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        max_position_embeddings=hf["max_position_embeddings"], rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 500000.0))),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=hf.get("initializer_range", 0.02), quant="ternary" if qc else "none", dtype="fp32")


def text_identity(path: str, hf: dict) -> dict:
    """Task identity for a folder made elsewhere: its tokenizer.json and stop token."""
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise TrainingError(f"{path} has no tokenizer.json (a fast tokenizer); generate/evaluate need one")
    gen = os.path.join(path, "generation_config.json")
    eos = (_read_json(gen) if os.path.isfile(gen) else {}).get("eos_token_id", hf.get("eos_token_id"))
    eos = eos[0] if isinstance(eos, list) else eos
    with open(tok_path, encoding="utf-8") as f:
        return identity_of_tokenizer(f.read(), eos)  # a task claims its own tokenizer; else plain text


def load_hf_bitnet_dir(path: str, latent: bool = True) -> dict:
    """A transformers BitNet folder as a checkpoint-like dict for model_from_checkpoint():
    {"model": latent-style state dict, "config", "config_class", "task", "step", "history"},
    plus "packed": the 2-bit state dict (weight_scale = mean|W|) when the folder holds one.

    Packed or offline weights have no latent; "model" then holds a latent whose BitLinear
    quantization reproduces them exactly (packing.latent_from_ternary), so the probes run;
    latent=False leaves it out (None), for code that runs on the 2 bits and wants no fp32 copy."""
    hf = _read_json(os.path.join(path, "config.json"))
    side_path = os.path.join(path, SIDECAR)
    side = _read_json(side_path) if os.path.isfile(side_path) else {}
    if side:
        cfg = config_of(side)
    else:
        cfg = our_config_from_hf(hf)
    state = {k: v.float() if v.is_floating_point() else v for k, v in _read_weights(path).items()}
    if cfg.tie_word_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    qc = hf.get("quantization_config") or {}
    packed = None
    if qc.get("quantization_mode") == "offline":
        # transformers' packed layers hold out_features/4 byte rows: the scales name the layers
        layers = [k[: -len(".weight_scale")] for k in state if k.endswith(".weight_scale")]
        if not layers:
            raise TrainingError(f"{path}: quantization_mode offline but no weight_scale tensors")
        out_features = {}
        for layer in layers:
            w, key = state[f"{layer}.weight"], f"{layer}.weight_scale"
            out_features[layer] = w.shape[0] * 4 if w.dtype == torch.uint8 else w.shape[0]
            if qc.get("linear_class", "bitlinear") == "bitlinear":  # BitLinear divides by its scale
                state[key] = 1.0 / state[key]
            if w.is_floating_point():  # unpacked ternary (AutoBitLinear offline, unpacked on save)
                state[f"{layer}.weight"] = pack_ternary(w.round().clamp(-1, 1))
        packed = dict(state)
        state = unpacked_state_dict(state, out_features) if latent else None
    elif qc and qc.get("quantization_mode") != "online":
        raise TrainingError(f"unknown BitNet quantization_mode {qc.get('quantization_mode')!r}")
    return {"model": state, "packed": packed, "config": asdict(cfg), "config_class": type(cfg).__name__,
            "task": side.get("task") or text_identity(path, hf), "step": side.get("step", 0),
            "history": side.get("history", []), "source": "hf"}


def load_any_checkpoint(path: str, latent: bool = True) -> dict:
    """trainer.load_checkpoint for run folders and ckpt.pt; load_hf_bitnet_dir for transformers
    folders (our exports and BitNet folders made elsewhere). The one hook diagnose needs."""
    if is_hf_dir(path):
        return load_hf_bitnet_dir(path, latent)
    return load_checkpoint(path)


def config_of(ckpt: dict):
    from . import config_tiny
    cls = getattr(config_tiny, ckpt.get("config_class", "BitNetConfig"), config_tiny.BitNetConfig)
    return cls(**ckpt["config"])


def packed_model_from_checkpoint(ckpt: dict, kernel: str = "unpack", device="cpu") -> BitNetForCausalLM:
    """A model whose BitLinears are PackedBitLinear holding only the 2-bit weights. Decoder layers
    are built and packed one at a time, so at most one layer's fp32 weights ever exist."""
    if ckpt.get("packed") is None:
        raise ValueError("this checkpoint holds no packed weights; export it with --packed")
    cfg = config_of(ckpt)
    model = BitNetForCausalLM(replace(cfg, num_hidden_layers=0))
    model.config = cfg
    for _ in range(cfg.num_hidden_layers):
        model.model.layers.append(pack_model(BitNetDecoderLayer(cfg, model.linear_cls), kernel, empty=True))
    model.load_state_dict(ckpt["packed"])
    return model.to(device).eval()


def main():
    p = argparse.ArgumentParser(description="Write a trained run as a transformers BitNetForCausalLM folder.")
    p.add_argument("--checkpoint", required=True, help="a run's OUT_DIR (or its ckpt.pt), or an earlier export")
    p.add_argument("--out", required=True, help="the folder to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--packed", action="store_true", help="2-bit ternary weights + scales instead of latent fp32")
    p.add_argument("--linear-class", default="autobitlinear", choices=LINEAR_CLASSES,
                   help="--packed: transformers layer that reads them (bitlinear = Microsoft's released layout)")
    args = p.parse_args()
    out = export(args.checkpoint, args.out, packed=args.packed, linear_class=args.linear_class)
    size = os.path.getsize(os.path.join(out, WEIGHTS))
    print(f"wrote {out} ({'packed 2-bit' if args.packed else 'online, latent fp32'}; {WEIGHTS} {size / 1e6:.2f} MB)")


if __name__ == "__main__":
    run_main(main)
