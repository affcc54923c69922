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
    # a trained model and its inference path (check_model)
    "generation_mismatch": problem("inference", FATAL, "make generate() agree with one full forward: cache positions "
                                                       "start at the cache length, and the next token comes from "
                                                       "logits[:, -1]"),
    "inference_not_deterministic": problem("inference", HARMFUL, "call model.eval() before generating (dropout off) "
                                                                 "and take argmax for greedy decoding"),
    "newline_lost": problem("tokenizer", HARMFUL, "use a tokenizer that keeps whitespace (byte-level BPE with a "
                                                  "ByteLevel decoder), not a Whitespace pre-tokenizer"),
    "decode_adds_spaces": problem("tokenizer", HARMFUL, "give the tokenizer the decoder matching its pre-tokenizer "
                                                        "(e.g. decoders.ByteLevel()), so decode does not join tokens "
                                                        "with spaces"),
    "lossy_normalizer": problem("tokenizer", HARMFUL, "drop the normalizer that changes the text (lower-casing, "
                                                      "Unicode folding)"),
    "unk_tokens": problem("tokenizer", HARMFUL, "use a byte-level tokenizer, or one whose vocabulary covers the text"),
    "decode_mismatch": problem("tokenizer", HARMFUL, "make decode(encode(x)) == x for the tokenizer you train and "
                                                     "sample with"),
    "dead_layer": problem("weights", HARMFUL, "find why the layer's weights went to zero (its learning rate, decay, "
                                              "or a layer left out of the optimizer)"),
    "one_sign_layer": problem("weights", HARMFUL, "check the layer's init and updates: ternary weights of one sign "
                                                  "carry almost no information"),
    "collapsed_weights": problem("optimizer", FATAL, "use torch.optim.AdamW (decoupled weight decay); L2 decay added "
                                                     "to the gradient (Adam(weight_decay=...)) collapses the latent "
                                                     "weights"),
    "activation_outliers": problem("model", HARMFUL, "normalise the input of every quantized layer (a sub-norm "
                                                     "before it), so a few outliers do not zero the int8 grid"),
    "inverted_weight_scale": problem("export", FATAL, "store weight_scale = mean|W| for a layer that multiplies by "
                                                      "it (1/mean|W| only for one that divides by it)"),
    "packed_weights_differ": problem("export", FATAL, "pack q = round(W / mean|W|).clamp(-1, 1) of the trained "
                                                      "latent weights, with their own mean|W|"),
    "loss_above_bigram": problem("training", FATAL, "fix training first: a model worse than a bigram of its own "
                                                    "text learned nothing beyond token pairs"),
    "loss_above_expected": problem("training", HARMFUL, "compare with a run of the same size on the same data; "
                                                        "check learning rate, schedule and data before scaling"),
}



def severity_of(name: str) -> str:
    """A problem not in the catalogue counts as harmful: unknown is never waved through as harmless."""
    return PROBLEMS.get(name, {}).get("severity", HARMFUL)


def is_deviation(name: str) -> bool:
    return severity_of(name) == DEVIATION
