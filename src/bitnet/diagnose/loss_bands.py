"""Where a held-out loss should stand for a model of N parameters trained on D tokens: a rough,
corpus-dependent band in bits per byte (so that vocabularies compare), with its sources.

TinyStories (corpus "tinystories"):
  lo(N)   the best published loss at this size: llama2.c's stories15M/42M/110M (Karpathy, README
          "Models" table: val loss 1.072 / 0.847 / 0.760 nats per token of the Llama 2 32K
          tokenizer), converted at an ASSUMED 4.0 bytes per token, interpolated in log N and
          extrapolated below 15M with the same power law (L ~ N^-0.23).
  hi(N,D) lo(N) + the ternary gap + a data term 61 / D^0.28 bits/byte: Chinchilla's data
          exponent (0.28), its constant set so that this repo's measured CPU run (2.56M params,
          3.3M tokens: 1.19 bits/byte on valid.txt, RESULTS.md) sits at 80% of hi; the same
          run at 9.8M tokens (1.07) is inside too.
Web text (corpus "web"): Chinchilla's fit L(N, D) = 1.69 + 406.4 / N^0.34 + 410.7 / D^0.28 nats
  per token of its 32K SentencePiece vocabulary (Hoffmann et al. 2022, approach 3), converted at
  an ASSUMED 4.0 bytes per token; band [0.85 L, 1.25 L] + the ternary gap. Only for N >= 50M (the
  fit was made on 70M-16B models; at a few million parameters it means nothing).
Ternary gap: 0.05 nats per token (BitNet b1.58, Ma et al. 2024: 12.87 vs 12.33 perplexity at
  700M, 0.04 nats; measured here +0.018 nats at 2.56M).
"""
import math

BYTES_PER_TOKEN_ASSUMED = 4.0
TERNARY_GAP_BPB = 0.05 / math.log(2) / BYTES_PER_TOKEN_ASSUMED
LLAMA2C = [(15e6, 1.072), (42e6, 0.847), (110e6, 0.760)]  # (params, nats/token), llama2.c README
SOURCES = {
    "tinystories": "llama2.c stories15M/42M/110M (lower edge) and this repo's CPU run, 2.56M params: 1.19 bits/byte "
                   "at 3.3M tokens (upper edge), Chinchilla's data exponent; rough, corpus-dependent",
    "web": "Chinchilla L(N,D) = 1.69 + 406.4/N^0.34 + 410.7/D^0.28 (Hoffmann et al. 2022) + ternary gap "
           "(Ma et al. 2024); rough, corpus- and tokenizer-dependent",
}


def _bpb(nats_per_token: float) -> float:
    return nats_per_token / math.log(2) / BYTES_PER_TOKEN_ASSUMED


def tinystories_lo(n_params: float) -> float:
    pts = [(math.log(n), math.log(_bpb(l))) for n, l in LLAMA2C]
    x = math.log(n_params)
    (x0, y0), (x1, y1) = (pts[0], pts[1]) if x < pts[1][0] else (pts[1], pts[2])
    return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def expected_band(corpus: str, n_params: float, tokens_seen: float | None) -> dict | None:
    """{"lo", "hi" (None when tokens_seen is unknown), "source"} in bits per byte, or None where no
    reference applies."""
    if corpus == "tinystories":
        lo = tinystories_lo(n_params)
        hi = lo + TERNARY_GAP_BPB + 61.0 / tokens_seen ** 0.28 if tokens_seen else None
        return {"lo": lo, "hi": hi, "source": SOURCES[corpus]}
    if corpus == "web" and n_params >= 50e6:
        if not tokens_seen:
            return {"lo": _bpb(1.69 + 406.4 / n_params ** 0.34) * 0.85, "hi": None, "source": SOURCES[corpus]}
        fit = _bpb(1.69 + 406.4 / n_params ** 0.34 + 410.7 / tokens_seen ** 0.28)
        return {"lo": 0.85 * fit, "hi": 1.25 * fit + TERNARY_GAP_BPB, "source": SOURCES[corpus]}
    return None
