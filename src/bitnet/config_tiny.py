"""Every experiment's numbers, as plain dataclasses.

Field names of the model part follow transformers' `BitNetConfig`, so a checkpoint's
config exports without renaming. Edit a class here, or override any field from the
command line with `--set name=value`.
"""
from dataclasses import dataclass, fields, replace


@dataclass
class BitNetConfig:
    # --- model (names as in transformers.BitNetConfig) ---
    vocab_size: int = 32
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    max_position_embeddings: int = 32  # context length
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    quant: str = "ternary"  # "ternary" (BitLinear) or "none" (the full-precision twin)
    inject_bug: str = ""  # self-test only: see bitnet.bugs.ALL_BUGS; "" = the correct stack
    # --- a user's own stack (bitnet.plugged; the train scripts' --linear/--model/--optimizer/--path) ---
    # SPECs as `module:Name` or `/abs/path/file.py:Name`, kept so that a checkpoint rebuilds the same model
    linear_spec: str = ""  # class for every projection of our model: Class(in, out[, bias=False])
    model_spec: str = ""  # factory f(cfg[, linear_cls=...]) -> nn.Module, input_ids [B, T] -> logits [B, T, V]
    optimizer_spec: str = ""  # factory f(model, cfg) -> torch.optim.Optimizer, in place of AdamW
    spec_paths: str = ""  # folders put first on sys.path before the SPECs resolve, joined by os.pathsep
    # --- training ---
    batch_size: int = 256
    learning_rate: float = 3e-3
    # The full-precision twin's own tuned rate (0 = learning_rate): ternary weights want a higher
    # rate than fp ones, so one shared rate would handicap one of the two.
    fp_learning_rate: float = 0.0
    min_lr_ratio: float = 0.1  # final lr = learning_rate * min_lr_ratio
    warmup_steps: int = 100
    max_steps: int = 3000
    schedule: str = "cosine"  # "cosine", or "two_stage": BitNet's high lr then a drop, wd off in stage two
    two_stage_split: float = 0.5  # fraction of steps in stage one (two_stage only)
    two_stage_lr_ratio: float = 0.3  # stage-two peak lr / stage-one peak lr (two_stage only)
    restart_steps: int = 0  # cosine only: anneal in cycles of about this many steps (0 = one cycle)
    restart_lr_ratio: float = 0.5  # each cycle's peak lr / the one before's
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float = 0.0  # on the residual branches; regularises when data is small
    dtype: str = "auto"  # "auto" (bf16 autocast where supported), "bf16" or "fp32"
    compile: bool = False  # torch.compile the training step: fuses the quantizers' elementwise ops
    eval_interval: int = 250
    # Time budget (seconds; 0 = off): after warm-up the run measures its own speed and sets
    # max_steps (and so the schedule) to fill the budget, so a faster machine trains longer.
    time_budget_s: float = 0.0
    stop_when_solved: bool = False  # stop at the first evaluation where the task says solved()
    checkpoint_interval_s: float = 60.0  # save at least this often (seconds), besides at every evaluation
    seed: int = 1337
    # --- scale-up (bitnet.distributed, bitnet.plan) ---
    grad_accum_steps: int = 1  # micro-batches per optimizer step; batch_size is the global batch over all of them
    peak_tflops: float = 0.0  # the device's peak bf16 TFLOPS, for MFU; 0 = look the GPU up (bitnet.plan.PEAK_TFLOPS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def with_overrides(self, pairs: list[str]) -> "BitNetConfig":
        """Apply `name=value` strings, converting each value to the field's type."""
        types = {f.name: f.type for f in fields(self)}
        changes = {}
        for pair in pairs:
            name, sep, raw = pair.partition("=")
            if not sep:
                raise ValueError(f"--set expects name=value, got {pair!r}")
            if name not in types:
                raise ValueError(f"--set: {type(self).__name__} has no field {name!r}; fields: {', '.join(types)}")
            changes[name] = _parse(raw, types[name], name)
        return replace(self, **changes)


def _parse(raw: str, typ, name: str):
    typ = typ if isinstance(typ, str) else typ.__name__
    try:
        if typ == "bool":
            if raw.lower() in ("1", "true", "yes"):
                return True
            if raw.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        return {"int": int, "float": float, "str": str}[typ](raw)
    except (ValueError, KeyError):
        raise ValueError(f"--set {name}={raw!r}: expected a value of type {typ}") from None


@dataclass
class BitNetConfigArithmetic(BitNetConfig):
    """The seed's ~5M arithmetic model (32-token character vocabulary). GPU default."""
    # problem domain (see arithmetic_problems.py); '*' and '/' are the times tables by default
    add_max: int = 99  # '+' operands 0..add_max
    sub_max: int = 99  # '-' operands 0..sub_max, never a negative result
    mul_max: int = 12  # '*' operands 0..mul_max
    div_max: int = 12  # '/' divisor 1..div_max, quotient 0..div_max
    operators: str = "+-*/"
    operator_weights: str = ""  # training mix, e.g. "3,3,1,1"; "" = equal. Evaluation is per operator.
    # Share of '+'/'-' training problems whose operands are drawn digit count first (1- and 2-digit
    # equally often) rather than uniformly (where 90% are 2-digit). Evaluation stays uniform.
    balance_digits: float = 0.0
    heldout_fraction: float = 0.1  # share of '+'/'-' problems never trained on
    # Write every number at its slot's full width ('07 + 12 = 019'), so each digit sits at a fixed
    # distance from the digits it depends on. Prompts typed to the tools are padded to match.
    pad_numbers: bool = False
    # Write each answer least-significant digit first ('07 + 12 = 910' for 019): the model then
    # emits a sum's digits in the order their carries arise. The tools show answers as usual.
    reverse_answers: bool = False
    eval_problems: int = 400  # per operator, per split, at each evaluation
    train_on: str = "answer"  # loss on the "answer" tokens only, or on "all" tokens


@dataclass
class BitNetConfigArithmeticCPU(BitNetConfigArithmetic):
    """A smaller preset (~0.85M) for 2 CPU cores: the launcher's twin pair finishes in < 10 minutes.

    Measured on 2-core CPUs (RESULTS.md, issue 9): answers written backwards, and operands drawn half
    uniformly and half digit-count-balanced, learn '+'/'-' sooner; the accuracy rises with the cosine's
    annealing, so the time budget sets the schedule's length. The run stops at the first evaluation
    where every operator scores >= 99.5% on the validation sets (finishing the schedule instead
    when less than one evaluation interval of it is left), or when the budget is spent.
    """
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 8  # more heads helped: each answer digit attends to a different operand digit
    num_key_value_heads: int = 8
    batch_size: int = 64  # batch 256 at lr 8e-3 learned less per problem at the same problems/s
    learning_rate: float = 5e-3  # 8e-3 stalled on '+' for 1,000+ steps
    fp_learning_rate: float = 2e-3  # the fp twin at 1.5e-3, 2e-3 and 3e-3 learned alike (RESULTS.md); 5e-3 lagged far behind
    min_lr_ratio: float = 0.02  # a near-zero final rate stops late ternary flips from costing accuracy
    max_steps: int = 3000  # without a time budget; with one, the budget sets the schedule
    warmup_steps: int = 100
    # An evaluation of 4,800 sampled problems (eager) cost ~60-66 training steps on a CPU core: every
    # 500 steps ~13% of the training time (bench/eval_cost.py, RESULTS.md issue 9). Scoring the small
    # sets whole (times tables, held-out '-') cut it to ~3,200 problems (cost not remeasured).
    eval_interval: int = 500
    time_budget_s: float = 540.0  # per model; with start-up (~10 s) and the verdict (~10 s) the launcher stays under 10 min
    stop_when_solved: bool = True
    compile: bool = True  # ~1.5x faster steps on a CPU after ~1 minute of compiling
    # '+'/'-' need an algorithm; '*'/'/' are 325 facts to memorise, but at "3,3,2,1" '/' lagged and
    # seed 4 solved only at its last evaluation; "3,3,3,2" was ahead on every operator at step 2,000
    # (RESULTS.md, issue 9, fifth pass). Equal weights were slower on '+' (fourth pass).
    operator_weights: str = "3,3,3,2"
    balance_digits: float = 0.5  # 1.0 (all balanced) learned '+' slower: too few 2-digit sums
    pad_numbers: bool = True  # '07 + 12 = 019': each digit at a fixed distance from the digits it needs
    # RoPE's default base (10,000) spends most rotary frequencies on distances far beyond these
    # 15-token problems; base 100 puts them at 1-15 positions, and '+' was learned in about half
    # the steps on the two seeds that were slowest at 10,000 (RESULTS.md, issue 9).
    rope_theta: float = 100.0
    # '07 + 12 = 910': the answer least-significant digit first, so each digit follows the one whose
    # carry it needs. '+' went from 4-8% to 47-75% at step 1,000 on the two slowest seeds, and both
    # solved within 3,000 steps (RESULTS.md, issue 9, fourth pass).
    reverse_answers: bool = True
    # One cosine fitted to the budget: a second annealing (restart_steps) knocked a run that was
    # nearly solved back from ~99% to 93% (seed 4, fp32) and it ran out of time recovering.
    restart_steps: int = 0


@dataclass
class BitNetConfigTiny(BitNetConfig):
    """The seed's ~12M TinyStories model (2,048-token BPE). GPU default (~2 h on an RTX 3060)."""
    vocab_size: int = 2048
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int = 6
    max_position_embeddings: int = 256
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 500
    max_steps: int = 20000
    weight_decay: float = 0.1
    eval_interval: int = 500
    eval_tokens: int = 262144  # validation tokens per evaluation (0 = the whole file)
    sample_tokens: int = 120  # length of each printed story


@dataclass
class BitNetConfigTinyCPU(BitNetConfigTiny):
    """A preset for 2 CPU cores (one per twin) that finishes in about 30 minutes.

    Measured here: ~2K tokens/s per process in a twin run (1 thread each, fp32, compiled), so
    30 minutes buy ~3.3M tokens, about 3.5 passes over the 3.3 MB local train split. A smaller
    model than the GPU's 12M sees more of the data in that time.
    """
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 6
    max_position_embeddings: int = 256
    # Batch, lr and dropout from equal-time 10-minute runs (RESULTS.md): with a budget this small,
    # more, smaller steps win: batch 16 -> 8 -> 4 sequences gave val loss 4.00 -> 3.74 -> 3.61
    # (batch 2: no better), and at batch 4 lr 2.5e-3 beat 4e-3 (3.54). Dropout went 0.1 -> 0
    # with the first batch change, so its own share is unmeasured.
    batch_size: int = 4
    learning_rate: float = 2.5e-3
    warmup_steps: int = 50
    max_steps: int = 3200  # replaced by what the time budget buys (measured after warm-up)
    time_budget_s: float = 1560.0  # 26 minutes per model: with the tokenizer and the verdict, ~30 for the launcher
    dropout: float = 0.0
    eval_interval: int = 800
    eval_tokens: int = 65536
    compile: bool = True


@dataclass
class BitNetConfigSmall(BitNetConfigTiny):
    """~30M: the first scale-up step."""
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    max_position_embeddings: int = 512
    learning_rate: float = 2e-3


@dataclass
class BitNetConfig95M(BitNetConfigTiny):
    """~95M: the size of the user's original run, for comparison on a GPU."""
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 10
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    learning_rate: float = 1.5e-3


@dataclass
class BitNetConfig200M(BitNetConfig95M):
    """~213M (180M without the embeddings), 32K vocabulary, 1,024-token context: the seed's "200M+
    for a 32K vocabulary", meant for FineWeb-Edu. 32,000 steps of 128 x 1,024 tokens = 4.2B tokens,
    about 20 per parameter (Chinchilla's ratio). Eight micro-batches of 16 by default, so that a 40 GB
    GPU holds one; `--dry-run` gives the memory at other settings (e.g. --set grad_accum_steps=4 on
    80 GB). lr: scaled down from 95m's, untuned."""
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 14
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    max_position_embeddings: int = 1024
    batch_size: int = 128
    grad_accum_steps: int = 8
    learning_rate: float = 1.2e-3
    warmup_steps: int = 1000
    max_steps: int = 32000
    eval_interval: int = 1000


PRESETS = {
    "arithmetic": BitNetConfigArithmetic,
    "arithmetic-cpu": BitNetConfigArithmeticCPU,
    "tiny": BitNetConfigTiny,
    "tiny-cpu": BitNetConfigTinyCPU,
    "small": BitNetConfigSmall,
    "95m": BitNetConfig95M,
    "200m": BitNetConfig200M,
}
