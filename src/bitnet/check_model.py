"""Judge a trained causal LM and the path from a prompt to printed text.

    python -m bitnet.check_model --checkpoint runs/tinystories/ternary --text valid.txt
    python -m bitnet.check_model --model my_code.py:load_trained --path DIR --tokenizer tok.json \\
        --generate my_code.py:generate --encode my_code.py:encode_prompt --text heldout.txt --tokens-seen 2e9

Checks (docs/check_model.md): generation against one full forward, determinism, prompt encoding
against training's, tokenizer round trip, the trained weights and activations, packed weights
against their latent ones, the held-out loss against n-gram baselines and a reference band, and
the generated samples. Prints a table of checks, the findings most severe first (what, where,
fix), a diagnosis (inference_path | training | capacity | ok) and, last, one JSON line
{"verdict", "diagnosis", "problems", "val_loss", "bits_per_byte", "expected_loss"}.
Exit 0 OK, 1 BROKEN, 2 bad input (one line).
"""
import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

from .diagnose import trained
from .diagnose.loss_bands import expected_band
from .diagnose.problems import PROBLEMS, SEVERITY_ORDER, severity_of
from .diagnose.tokenizer_checks import roundtrip_report, tokenizer_of
from .errors import TrainingError, run_main
from .spec import resolve_spec

EOT = "<|endoftext|>"
INFERENCE_PARTS = {"inference", "tokenizer", "data", "export"}


class InputError(ValueError):
    """Bad input: exit 2 with one line."""


@dataclass
class Subject:
    """The model under test and its inference path, whatever produced them."""
    model: torch.nn.Module
    generate: Callable  # (ids: list[int], n) -> list[int], the inference path's greedy generation
    encode_prompt: Callable  # str -> ids, as inference encodes a prompt
    encode_plain: Callable  # str -> ids, no special tokens
    decode: Callable
    prefix: list  # ids training put before each document
    stop_id: int | None = None
    unk_id: int | None = None
    normalize: Callable | None = None
    tokens_seen: float | None = None
    corpus: str = ""
    loss_is_objective: bool = True  # False for a model trained on answers only (arithmetic)
    optimizer_hint: str = ""
    packed: dict = field(default_factory=dict)  # {layer: (q, weight_scale)} of a 2-bit folder
    latent: dict = field(default_factory=dict)  # {layer: latent weight} where the trained latent still exists
    notes: list = field(default_factory=list)
    identity: dict = field(default_factory=dict)  # the checkpoint's task identity (empty for --model)


# ----------------------------------------------------------------------------- inputs
def from_checkpoint(path: str, notes: list) -> Subject:
    from .generate import load_for_inference, runs_at
    runs = runs_at(path)
    if len(runs) > 1:
        notes.append(f"twin run: judging {runs['ternary']}; the twin is --checkpoint {runs['fp twin']}")
    path = next(iter(runs.values()))
    model, codec, ckpt = load_for_inference(path)
    prefix = codec.encode("")
    cfg = ckpt.get("config") or {}
    step = ckpt.get("step", 0)
    tokens = step * cfg.get("batch_size", 0) * cfg.get("max_position_embeddings", 0) or None
    hint = ""
    opt = ckpt.get("optimizer_class")
    if opt and "adamw" not in opt.lower() and cfg.get("weight_decay", 0) > 0:
        hint = f"; the checkpoint's optimizer is {opt} with weight_decay={cfg['weight_decay']:g} (L2 in the gradient)"

    def generate(ids, n):
        return model.generate(torch.tensor([ids]), n, stop_token=codec.stop_id)[0].tolist()
    subject = Subject(model, generate, codec.encode, lambda s: codec.encode(s)[len(prefix):], codec.decode, prefix,
                      stop_id=codec.stop_id, tokens_seen=tokens, optimizer_hint=hint,
                      corpus=getattr(codec, "corpus", ""),  # the task says which reference band fits its text
                      loss_is_objective=cfg.get("train_on", "all") == "all", notes=notes,
                      identity=ckpt.get("task") or {})
    if ckpt.get("packed") is not None:
        subject.packed, subject.latent = packed_and_latent(path, ckpt)
    return subject


def packed_and_latent(path: str, ckpt: dict) -> tuple[dict, dict]:
    """{layer: (q, scale)} from a 2-bit folder and {layer: latent W} from the run it was exported
    from, when bitnet_tiny.json names one that still exists."""
    from .packing import unpack_ternary
    from .checkpoint import load_checkpoint
    state = ckpt["packed"]
    layers = [k[:-len(".weight_scale")] for k in state if k.endswith(".weight_scale")]
    latent = {}
    side = os.path.join(path, "bitnet_tiny.json")
    source = json.load(open(side, encoding="utf-8")).get("source") if os.path.isfile(side) else None
    if source and os.path.exists(source):
        full = load_checkpoint(source)["model"]
        latent = {n: full[f"{n}.weight"] for n in layers if f"{n}.weight" in full}
    packed = {n: (unpack_ternary(state[f"{n}.weight"], latent[n].shape[0] if n in latent else None),
                  state[f"{n}.weight_scale"]) for n in layers}
    return packed, latent


def tokenizer_roundtrip(s, docs: list[str], max_docs: int = 500) -> tuple[list, dict]:
    """decode(encode(doc)) == doc on the held-out documents (check_tokenizer's report and names,
    plus whitespace_lost for newlines that do not come back): (findings, evidence)."""
    docs = [d for d in docs if d.strip()][:max_docs]
    codec = SimpleNamespace(encode=s.encode_plain, decode=s.decode, unk_id=s.unk_id,
                            normalize=s.normalize or (lambda text: text))
    report = roundtrip_report(codec, docs, newlines_first=True)
    first = report["first_difference"]
    findings = [{"name": cause, "where": "tokenizer decode(encode(text))",
                 "evidence": f"{report['examples_failing_by_cause'].get(cause, 0)} of {len(docs)} held-out documents "
                             f"do not come back" + (f"; first: {first['original']!r} -> {first['decoded']!r}"
                                                    if first and first["cause"] == cause else "")}
                for cause in report["problems"]]
    return findings, {"documents": len(docs), "exact": report["exact"],
                      "failing_by_cause": report["examples_failing_by_cause"]}


def load_tokenizer(spec: str, paths):
    """(encode with the tokenizer's own specials, encode plain, decode, unk id, normalize), from
    --tokenizer as check_data reads it (diagnose.tokenizer_checks.tokenizer_of)."""
    codec = tokenizer_of(spec, paths)
    return codec.encode_for_inference, codec.encode, codec.decode, codec.unk_id, codec.normalize


def user_code(fn, flag: str):
    """fn, with any exception it raises turned into one line naming the flag (exit 2)."""
    def call(*args):
        try:
            return fn(*args)
        except Exception as e:
            raise InputError(f"{flag} raised {type(e).__name__}: {str(e).strip()[:200]}") from None
    return call


def user_generate(fn, model):
    """The user's f(model, input_ids [1, T], max_new_tokens) -> ids, as (ids: list, n) -> list."""
    def generate(ids, n):
        out = fn(model, torch.tensor([ids]), n)
        out = out.sequences if hasattr(out, "sequences") else out
        out = out.tolist() if torch.is_tensor(out) else list(out)
        return list(out[0]) if out and isinstance(out[0], (list, tuple)) else out
    return generate


def from_spec(args, notes: list) -> Subject:
    factory = resolve_spec(args.model, args.path)
    try:
        model = factory() if callable(factory) else factory
    except Exception as e:  # the user's loader failed: say where, in one line
        raise InputError(f"--model {args.model} raised {type(e).__name__}: {str(e).strip()[:200]}") from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"--model {args.model} returned {type(model).__name__}, not an nn.Module; give a "
                         f"function that returns your trained model")
    if not args.tokenizer:
        raise InputError("--model needs --tokenizer (a tokenizer.json, a transformers folder or a SPEC)")
    encode, plain, decode, unk, normalize = load_tokenizer(args.tokenizer, args.path)
    sep = plain(args.separator) if args.separator else []
    if len(sep) != 1:
        notes.append(f"the separator {args.separator!r} is not one token of this tokenizer: documents are scored "
                     f"without a prefix")
        sep = []
    generate = (lambda ids, n: trained.greedy_reference(model, ids, n))
    if not args.generate:
        notes.append("no --generate: the generation checks ran our plain greedy loop")
    return Subject(model, generate, encode, plain, decode, sep, stop_id=sep[0] if sep else None, unk_id=unk,
                   normalize=normalize, notes=notes)


def read_docs(path: str, separator: str) -> list[str]:
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read --text {path}: {e}") from None
    parts = text.split(separator) if separator and separator in text else text.split("\n\n")
    docs = [p.strip() for p in parts if p.strip()]
    if len(docs) < 2:
        raise InputError(f"--text {path} holds fewer than 2 documents; separate them with {separator!r} (--separator)")
    return docs


def task_documents(s: Subject, n: int = 200) -> list[str] | None:
    """Held-out documents a run's task writes itself (arithmetic problems), or None."""
    from .tasks import heldout_documents
    return heldout_documents(s.identity, s.model.config, n) if s.identity else None


# ----------------------------------------------------------------------------- the checks
def prompt_of(doc: str) -> str:
    """What a user would type: an arithmetic problem up to its '=', else the document's first 5 words."""
    if re.match(r"^\s*\d+\s*[-+*/]\s*\d+\s*=", doc):
        return doc[:doc.index("=") + 1]
    return " ".join(doc.split()[:5])


def judge(s: Subject, docs: list[str], n_new: int = 24, max_tokens: int = 100_000) -> dict:
    with torch.no_grad(), trained.quantized_once(s.model):
        return run_checks(s, docs, n_new, max_tokens)


def run_checks(s: Subject, docs: list[str], n_new: int, max_tokens: int) -> dict:
    rows, findings, out = [], [], {"val_loss": None, "bits_per_byte": None, "expected_loss": None}

    def record(check, found, evidence):
        rows.append((check, "FAIL" if found else "ok", evidence))
        findings.extend(found)

    prompts = [s.encode_prompt(prompt_of(d)) for d in docs[:3]]
    found, ev, samples = trained.check_generation(s.model, s.generate, prompts, n_new, s.stop_id)
    nondet = [f for f in found if f["name"] == "inference_not_deterministic"]
    record("determinism", nondet, "two greedy calls agree" if not nondet else nondet[0]["evidence"])
    record("generation vs forward", [f for f in found if f not in nondet],
           f"{ev.get('compared_tokens', 0)} generated tokens compared" if not nondet else "skipped: not deterministic")
    found, ev = trained.check_prompt_format(s.model, docs, lambda d: s.prefix + s.encode_plain(d), s.encode_prompt,
                                            lambda ids: [s.decode([i]) for i in ids])
    record("prompt encoding vs training", found, ev.get("note") or f"gap {ev['gap_nats']:+.2f} nats on first tokens")
    found, ev = tokenizer_roundtrip(s, docs)
    record("tokenizer round trip", found, f"{ev['exact']}/{ev['documents']} documents exact")
    token_docs = [s.encode_plain(d) for d in docs]
    context = trained.context_length(s.model)
    layers = quantized_modules(s.model)
    found, ev = trained.check_weights([(n, w) for n, w in layer_weights(layers, s)], s.optimizer_hint)
    record("trained weights", found, f"{ev['layers']} quantized layers" + (
        f", ternary zeros {ev['zero_share_range'][0]:.0%}-{ev['zero_share_range'][1]:.0%}" if ev["layers"] else ""))
    if layers:
        batch = torch.tensor([[t for d in token_docs[:20] for t in s.prefix + d][:context]])
        found, ev = trained.check_activations(s.model, layers, batch)
        record("activation outliers", found, f"max share of int8 zeros {ev['max_zero_share'] or 0:.0%}")
    if s.packed:
        found, ev = trained.check_packed_scales(s.packed, s.latent)
        record("packed vs latent weights", found, f"{ev['compared_layers']} layers compared" if ev["compared_layers"]
               else "no latent weights to compare with")
        if not ev["compared_layers"]:
            found, ev = trained.check_scale_convention(s.model, lambda: trained.heldout_loss(
                s.model, token_docs[:20], s.prefix, context, 1, max_tokens=2048)["val_loss"])
            record("packed scale convention", found, f"loss {ev['loss_as_stored']:.2f} as stored, "
                                                     f"{ev['loss_scales_inverted']:.2f} inverted")
    if s.loss_is_objective:
        loss_checks(s, docs, token_docs, context, max_tokens, record, out)
    from .diagnose.detectors import detect_gibberish_samples, detect_repetitive_samples, words_of
    texts = [s.decode([t for t in ids if t != s.stop_id]) for ids in samples]
    rep = detect_repetitive_samples(texts)
    gib = detect_gibberish_samples(texts, set(words_of(" ".join(docs))))
    pathological = not (rep["passed"] and gib["passed"])
    rows.append(("samples", "weak" if pathological else "ok",
                 f"repeat rate {rep['evidence'].get('repeated_3gram_rate', 0):.2f}, unknown words "
                 f"{gib['evidence'].get('unknown_share', 0):.0%} in {len(texts)} greedy samples"))
    findings.sort(key=lambda f: SEVERITY_ORDER[severity_of(f["name"])])
    problems = list(dict.fromkeys(f["name"] for f in findings))
    parts = {PROBLEMS.get(p, {}).get("part", "training") for p in problems}
    diagnosis = ("inference_path" if parts & INFERENCE_PARTS else "training" if problems
                 else "capacity" if pathological else "ok")
    out.update(verdict="BROKEN" if problems else "OK", diagnosis=diagnosis, problems=problems)
    return {"rows": rows, "findings": findings, "result": out, "samples": texts}


def loss_checks(s: Subject, docs, token_docs, context, max_tokens, record, out):
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    loss = trained.heldout_loss(s.model, token_docs, s.prefix, context, n_bytes, max_tokens)
    vocab = trained.forward_logits(s.model, torch.tensor([s.prefix or [0]])).shape[-1]
    base = trained.ngram_baselines([s.prefix + d for d in token_docs], vocab)
    out.update(val_loss=loss["val_loss"], bits_per_byte=loss["bits_per_byte"])
    judged = s.tokens_seen is None or s.tokens_seen >= 1000 * vocab
    found = []
    if loss["val_loss"] > base["bigram"] and judged:
        found.append({"name": "loss_above_bigram", "where": "held-out loss",
                      "evidence": f"{loss['val_loss']:.3f} nats/token, worse than a bigram of the held-out text "
                                  f"({base['bigram']:.3f}; unigram {base['unigram']:.3f})"})
    record("loss vs n-gram baselines", found, f"{loss['val_loss']:.3f} nats ({loss['bits_per_byte']:.3f} bits/byte) on "
           f"{loss['tokens']:,} tokens; bigram {base['bigram']:.3f}, unigram {base['unigram']:.3f}"
           + ("" if judged else f" (only {s.tokens_seen:,.0f} tokens seen: not judged)"))
    n_params = sum(p.numel() for p in {id(p): p for p in s.model.parameters()}.values())
    band = expected_band(s.corpus, n_params, s.tokens_seen)
    if band is None:
        record("loss vs reference band", [], f"no reference for corpus {s.corpus or '?'} at {n_params / 1e6:.1f}M "
                                             f"params (--corpus tinystories|web)")
        return
    per_byte = n_bytes / max(sum(len(d) for d in token_docs), 1) * math.log(2)  # bits/byte -> nats/token
    out["expected_loss"] = [band["lo"] * per_byte, band["hi"] * per_byte if band["hi"] else None]
    found = []
    if band["hi"] and loss["bits_per_byte"] > band["hi"]:
        found.append({"name": "loss_above_expected", "where": "held-out loss",
                      "evidence": f"{loss['bits_per_byte']:.3f} bits/byte, above the {band['hi']:.3f} expected at "
                                  f"{n_params / 1e6:.1f}M params and {s.tokens_seen:,.0f} tokens"})
    hi = f"{band['hi']:.3f}" if band["hi"] else "? (give --tokens-seen)"
    record("loss vs reference band", found, f"{loss['bits_per_byte']:.3f} bits/byte vs [{band['lo']:.3f}, {hi}] "
                                            f"({band['source']})")


def quantized_modules(model) -> list:
    """Modules that quantize their weights: ours (BitLinear, PackedBitLinear) or, in a model that is
    not ours, any module whose class name says bit/ternary/quant and holds a 2-D weight."""
    from .bitlinear import BitLinear
    from .packing import PackedBitLinear
    if getattr(getattr(model, "config", None), "quant", "ternary") == "none":
        return []
    named = re.compile(r"bit|ternary|quant", re.I)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (BitLinear, PackedBitLinear)) or (named.search(type(m).__name__) and
                                                               getattr(getattr(m, "weight", None), "dim", int)() == 2)]


def layer_weights(layers, s: Subject):
    from .packing import PackedBitLinear
    for name, m in layers:
        if isinstance(m, PackedBitLinear):
            yield name, m.ternary(torch.float32) * m.weight_scale
        elif m.weight.is_floating_point():
            yield name, m.weight


# ----------------------------------------------------------------------------- output
def print_report(report: dict, source: str):
    print(f"check_model: {source}")
    for note in report.get("notes", []):
        print(f"  note: {note}")
    for check, status, evidence in report["rows"]:
        print(f"  {check:<30} {status:<5} {evidence}")
    if report["findings"]:
        print("findings, most severe first:")
    for f in report["findings"]:
        info = PROBLEMS.get(f["name"], {})
        print(f"  [{severity_of(f['name'])}] {f['name']} ({info.get('part', '?')}: {f['where']}): {f['evidence']}")
        print(f"      fix: {info.get('fix', '-')}")
    r = report["result"]
    print(f"diagnosis: {r['diagnosis']}")
    print(json.dumps({k: r[k] for k in ("verdict", "diagnosis", "problems", "val_loss", "bits_per_byte",
                                        "expected_loss")}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Judge a trained causal LM and its inference path.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a run's OUT_DIR (twin runs: OUT), or a transformers BitNet folder")
    src.add_argument("--model", metavar="SPEC", help="f() -> nn.Module returning your trained model")
    p.add_argument("--path", action="append", default=[], help="folder to import SPECs from (repeatable)")
    p.add_argument("--tokenizer", metavar="PATH|SPEC", help="tokenizer.json, a transformers folder, or a SPEC")
    p.add_argument("--generate", metavar="SPEC", help="f(model, input_ids, max_new_tokens) -> ids, greedy")
    p.add_argument("--encode", metavar="SPEC", help="f(str) -> ids: how your inference path encodes a prompt")
    p.add_argument("--text", metavar="FILE", help="held-out text (an arithmetic run draws its own problems)")
    p.add_argument("--separator", default=EOT, help=f"between documents in --text (default {EOT})")
    p.add_argument("--tokens-seen", type=float, default=None, help="training tokens (our checkpoints carry it)")
    p.add_argument("--corpus", choices=["tinystories", "web", "none"], help="reference band (default: the run's task)")
    p.add_argument("--max-tokens", type=int, default=100_000, help="held-out tokens to score")
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    try:
        notes = []
        s = from_checkpoint(args.checkpoint, notes) if args.checkpoint else from_spec(args, notes)
        if args.checkpoint and args.tokenizer:
            s.encode_prompt, s.encode_plain, s.decode, s.unk_id, s.normalize = load_tokenizer(args.tokenizer, args.path)
        if args.generate:
            fn = user_code(resolve_spec(args.generate, args.path), f"--generate {args.generate}")
            s.generate = user_generate(fn, s.model)
        if args.encode:
            fn = user_code(resolve_spec(args.encode, args.path), f"--encode {args.encode}")
            s.encode_prompt = lambda text: list(fn(text))
        s.tokens_seen = args.tokens_seen or s.tokens_seen
        s.corpus = "" if args.corpus == "none" else args.corpus or s.corpus
        if args.text:
            docs = read_docs(args.text, args.separator)
        elif not (docs := task_documents(s)):
            raise InputError("give --text FILE: held-out text, documents separated as in training")
        report = judge(s, docs, args.max_new_tokens, args.max_tokens)
    except (ValueError, OSError, TrainingError) as e:  # bad input (InputError, SpecError), a refused checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["notes"] = s.notes
    print_report(report, args.checkpoint or args.model)
    return 0 if report["result"]["verdict"] == "OK" else 1


if __name__ == "__main__":
    sys.exit(run_main(main))  # a bug of ours exits 70 with its traceback, never 1 (BROKEN)
