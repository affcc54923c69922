"""Every problem a check can name: the part of the stack that holds it, how bad it is, and the fix.

One catalogue for check_layer, the verdict of a training run, check_model and check_data, so a
problem has one name, one severity and one fix everywhere. A leaf module: it imports nothing.

Severity:
  fatal      nothing trains, or the output is off by a whole scale (zero gradients, outputs off by
             1/mean|W| or 127/max|x|, labels that give the answer away)
  harmful    it trains, but it is not b1.58 and quality suffers (binary weights, a per-tensor
             scale, a quantized output, a norm rebuilt in forward, an unused bias, a bad init)
  deviation  a harmless convention; listed apart with its measured size, never makes BROKEN
Only fatal and harmful problems make a verdict BROKEN.
"""
FATAL, HARMFUL, DEVIATION = "fatal", "harmful", "deviation"
SEVERITY_ORDER = {FATAL: 0, HARMFUL: 1, DEVIATION: 2}


def problem(part: str, severity: str, fix: str) -> dict:
    return {"part": part, "severity": severity, "fix": fix}


PROBLEMS = {
    # the layer
    "no_ste": problem("layer", FATAL, "pass the quantizers' gradients straight through: w + (quant(w) - w).detach(), "
                                      "the same for x"),
    "missing_rescale": problem("layer", FATAL, "divide the integer product back by both scales (or dequantize x_q/s_x "
                                               "and w_q/s_w before the matmul)"),
    "wrong_weight_scale": problem("layer", FATAL, "scale by s = 1 / mean|W|: round(W * s).clamp(-1, 1) / s"),
    "weights_not_trainable": problem("layer", FATAL, "keep the latent weight an nn.Parameter with requires_grad=True, "
                                                     "built in __init__"),
    "per_tensor_act_scale": problem("layer", HARMFUL, "one activation scale per token: "
                                                      "127 / x.abs().amax(dim=-1, keepdim=True)"),
    "quantizes_output": problem("layer", HARMFUL, "quantize the layer's input activations before the matmul, "
                                                  "not its output"),
    "binary_not_ternary": problem("layer", HARMFUL, "ternary weights: round(W / mean|W|).clamp(-1, 1) * mean|W|, "
                                                    "not sign(W)"),
    "binary_activations": problem("layer", HARMFUL, "8-bit activations: round(x * 127 / absmax).clamp(-128, 127), "
                                                    "not sign(x)"),
    "act_not_rounded": problem("layer", HARMFUL, "round the scaled activations to integers (then clamp to [-128, 127])"),
    "wrong_norm_scale": problem("layer", HARMFUL, "normalize to unit RMS (RMSNorm), not F.normalize(x) * dim**-0.5"),
    "bias_unused": problem("layer", HARMFUL, "add the bias to the output, or build the layer with bias=False"),
    "weights_not_quantized": problem("layer", HARMFUL, "quantize the weights to ternary in forward (absmean), "
                                                       "not a plain nn.Linear"),
    # harmless conventions of a layer: listed as deviations with their measured size
    "act_grid_128": problem("layer", DEVIATION, "none needed; the recipe uses 127/max|x| (a 128 scale clips the "
                                                "largest activation by one level)"),
    "per_row_weight_scale": problem("layer", DEVIATION, "none needed; the recipe uses one mean|W| per matrix"),
    "scales_after_matmul": problem("layer", DEVIATION, "none needed; integer operands rescaled after the matmul "
                                                       "equal the recipe"),
    "grad_scaled_per_tensor": problem("layer", DEVIATION, "none needed; a uniform gradient scale per tensor is "
                                                          "absorbed by Adam"),
    # the model
    "norm_in_forward": problem("model", HARMFUL, "build the norm once in __init__ so it is registered, trained and "
                                                 "saved"),
    "residual_bug": problem("model", FATAL, "keep both residuals: x = x + attn(norm(x)); x = x + mlp(norm(x))"),
    "no_causal_mask": problem("model", FATAL, "mask future positions: scaled_dot_product_attention(..., "
                                              "is_causal=True) or a lower-triangular mask"),
    "init_scale_too_large": problem("model", HARMFUL, "initialise embeddings (and a tied head) with std ~0.02 "
                                                      "(initializer_range), not nn.Embedding's default N(0, 1)"),
    "init_scale_too_small": problem("model", FATAL, "initialise the weight matrices with std ~0.02 (initializer_range); "
                                                    "weights near 0 quantize to all zeros"),
    "params_without_gradient": problem("model", HARMFUL, "every registered parameter must take part in forward: "
                                                         "remove unused modules, or find the fault upstream that "
                                                         "stops their gradient"),
    # the optimizer
    "coupled_weight_decay": problem("optimizer", FATAL, "use torch.optim.AdamW (decoupled weight decay), or Adam "
                                                        "with weight_decay=0"),
    "params_not_in_optimizer": problem("optimizer", HARMFUL, "build the optimizer from model.parameters(), or from "
                                                             "groups that cover every trainable parameter"),
    # the data pipeline
    "unshifted_labels": problem("data", FATAL, "labels are the next tokens: y[t] = x[t+1] (shift by one, unless the "
                                               "model shifts internally)"),
    "train_inference_mismatch": problem("data", HARMFUL, "format inference prompts exactly as training sequences "
                                                         "(the same BOS and special tokens, the same spacing)"),
    # the data pipeline, as check_data sees a loader's batches
    "labels_misaligned": problem("data", FATAL, "labels are the inputs for a model that shifts (transformers), the "
                                                "inputs shifted by one for one that does not; shift exactly once"),
    "padding_in_loss": problem("data", HARMFUL, "set the labels of padded positions to -100 (the ignore index), e.g. "
                                                "labels[attention_mask == 0] = -100"),
    "token_out_of_range": problem("data", FATAL, "make the model's vocab_size at least the tokenizer's (len(tokenizer)), "
                                                 "and keep every id in [0, vocab_size)"),
    "no_document_separator": problem("data", HARMFUL, "put the tokenizer's EOS (or BOS) token between documents when "
                                                      "packing: ids = [*doc_ids, eos_id] for each document"),
    "repeated_batches": problem("data", HARMFUL, "read each shard once per epoch and carry the stream's position; "
                                                 "do not restart the iterator at every batch"),
    "ranks_share_data": problem("data", HARMFUL, "give each rank its own part: split_dataset_by_node(ds, rank, "
                                                 "world_size), a DistributedSampler, or every world_size-th document"),
    "val_in_train": problem("data", HARMFUL, "hold validation out of the training stream (another split, or "
                                             "ds.skip(n) for training after ds.take(n) for validation)"),
    "whitespace_lost": problem("data", HARMFUL, "use a tokenizer that keeps newlines and spaces (a ByteLevel "
                                                "pre-tokenizer and decoder), not a Whitespace pre-tokenizer"),
    "decode_adds_spaces": problem("data", HARMFUL, "give the tokenizer the decoder matching its pre-tokenizer "
                                                   "(ByteLevel with ByteLevel, Metaspace with Metaspace)"),
    "unk_tokens": problem("data", HARMFUL, "use a byte-level tokenizer (or byte fallback) so every character "
                                           "encodes, or train the vocabulary on this text"),
    "lossy_normalizer": problem("data", HARMFUL, "drop the normalizer that changes the text (Lowercase, NFKC "
                                                 "folding) so decode(encode(x)) == x"),
    "decode_mismatch": problem("data", HARMFUL, "make decode(encode(x)) == x: check the tokenizer's pre-tokenizer, "
                                                "decoder and normalizer"),
}


def severity_of(name: str) -> str:
    """A problem not in the catalogue counts as harmful: unknown is never waved through as harmless."""
    return PROBLEMS.get(name, {}).get("severity", HARMFUL)


def is_deviation(name: str) -> bool:
    return severity_of(name) == DEVIATION
