"""Synthetic arithmetic: problems like `12 + 7 = 19` (written as text by arithmetic_codec.py:
the 32-token character tokenizer and the codec), and the held-out split that shows
generalisation rather than memory.

Default domain (the seed's): '+' and '-' with operands 0-99 (subtraction never
negative), '*' the times tables 0-12, '/' exact (a = b*c, divisor b 1-12, quotient
c 0-12). Every range is a config field. A fixed share of the '+'/'-' problems is held
out by a hash of the problem itself, so it can never reach a training batch whatever
the seed.
"""
import hashlib
import math
from dataclasses import dataclass

import torch

from .arithmetic_codec import (CHARS, ArithmeticCodec, CharTokenizer, format_prompt, parse_problem,  # noqa: F401
                               read_answer)
from .taskkit import unigram_loss


def solve(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]


def is_heldout(a: int, op: str, b: int, fraction: float) -> bool:
    """Deterministic, seed-independent split: a multiplicative hash of the problem."""
    if op not in "+-" or fraction <= 0:
        return False
    return _problem_hash(a, op, b) < fraction


def _problem_hash(a: int, op: str, b: int) -> float:
    """A well-mixed hash of the problem, uniform in [0, 1). (A linear hash such as (a*K1 + b*K2)*M
    mod 2**32 puts structured slabs of problems, e.g. small b, in any band, so its held-out set
    and the halves of it would not look like the rest.)"""
    digest = hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def heldout_part(a: int, op: str, b: int, fraction: float) -> str:
    """Which half of the held-out problems (hash < fraction) this one is in: the lower half of the
    band, 'val', steers when training stops; the upper half, 'test', is what is reported. Neither
    is ever trained on, and the reported half never influences the run."""
    return "val" if _problem_hash(a, op, b) < fraction / 2 else "test"


@dataclass
class ArithmeticDomain:
    add_max: int = 99
    sub_max: int = 99
    mul_max: int = 12
    div_max: int = 12
    operators: str = "+-*/"
    heldout_fraction: float = 0.1
    operator_weights: tuple[float, ...] = ()  # training mix; () = equal
    balance_digits: float = 0.0  # share of '+'/'-' training operands drawn with their digit count balanced
    pad_numbers: bool = False  # '07 + 12 = 019': every number at its slot's full width (see widths())
    reverse_answers: bool = False  # the answer written least-significant digit first: '07 + 12 = 910'

    @classmethod
    def from_config(cls, cfg) -> "ArithmeticDomain":
        bad = set(cfg.operators) - set("+-*/")
        if bad or not cfg.operators or len(set(cfg.operators)) != len(cfg.operators):
            raise ValueError(f"operators must be distinct symbols from '+-*/', got {cfg.operators!r}")
        try:
            weights = tuple(float(w) for w in cfg.operator_weights.split(",")) if cfg.operator_weights else ()
        except ValueError:
            weights = (-1.0,)
        if weights and (len(weights) != len(cfg.operators) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"operator_weights must be {len(cfg.operators)} non-negative numbers like '3,3,1,1' "
                             f"(one per operator in {cfg.operators!r}), got {cfg.operator_weights!r}; --set operator_weights= for equal")
        dom = cls(cfg.add_max, cfg.sub_max, cfg.mul_max, cfg.div_max, cfg.operators, cfg.heldout_fraction, weights,
                  getattr(cfg, "balance_digits", 0.0), getattr(cfg, "pad_numbers", False),
                  getattr(cfg, "reverse_answers", False))
        if not 0 <= dom.balance_digits <= 1:
            raise ValueError(f"balance_digits must be in [0, 1], got {dom.balance_digits}")
        if min(dom.add_max, dom.sub_max, dom.mul_max) < 0 or dom.div_max < 1:
            raise ValueError("operand ranges must be >= 0 (div_max >= 1)")
        if not 0 <= dom.heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in [0, 1)")
        return dom

    def widths(self, op: str) -> tuple[int, int, int]:
        """Digits of the widest a, b and answer of `op` (what pad_numbers pads to)."""
        widest = {"+": (self.add_max, self.add_max, 2 * self.add_max), "-": (self.sub_max, self.sub_max, self.sub_max),
                  "*": (self.mul_max, self.mul_max, self.mul_max ** 2),
                  "/": (self.div_max ** 2, self.div_max, self.div_max)}[op]
        return tuple(len(str(n)) for n in widest)

    def prompt(self, a: int, op: str, b: int) -> str:
        return format_prompt(a, op, b, *self.widths(op)[:2]) if self.pad_numbers else format_prompt(a, op, b)

    def answer(self, a: int, op: str, b: int) -> str:
        """The answer as a person reads it ('019' with pad_numbers)."""
        return f"{solve(a, op, b):0{self.widths(op)[2] if self.pad_numbers else 0}d}"

    def written_answer(self, a: int, op: str, b: int) -> str:
        """The answer as the model reads and writes it: reversed with reverse_answers ('910')."""
        text = self.answer(a, op, b)
        return text[::-1] if self.reverse_answers else text

    def number_format(self) -> dict:
        """What the checkpoint records so tools format prompts as training did."""
        return {op: list(self.widths(op)) for op in self.operators} if self.pad_numbers else {}

    def max_length(self) -> int:
        """Input positions of the longest training sequence: <bos> + `a op b = c` + newline, minus
        the one that is only a target."""
        return max(sum(self.widths(op)) + len(" + ") + len(" = ") + len("\n") for op in self.operators)

    def sample_one(self, op: str, g: torch.Generator, training_mix: bool = False) -> tuple[int, int]:
        """Operands for `op`: uniform, or for training batches (`training_mix`) partly digit-balanced."""
        def r(hi: int) -> int:  # uniform integer in [0, hi]
            return int(torch.randint(0, hi + 1, (1,), generator=g))

        def by_digits(hi: int) -> int:  # digit count uniform first, then the value: short operands get their share
            n = 1 + r(len(str(hi)) - 1)
            lo = 0 if n == 1 else 10 ** (n - 1)
            return lo + r(min(hi, 10 ** n - 1) - lo)

        balanced = (training_mix and op in "+-" and self.balance_digits > 0
                    and float(torch.rand((), generator=g)) < self.balance_digits)
        draw = by_digits if balanced else r
        if op == "+":
            return draw(self.add_max), draw(self.add_max)
        if op == "-":
            a = draw(self.sub_max)
            return a, draw(a)  # b <= a: never negative
        if op == "*":
            return r(self.mul_max), r(self.mul_max)
        b = 1 + r(self.div_max - 1)  # divisor 1..div_max
        return b * r(self.div_max), b  # exact: a = b * quotient

    def count(self, op: str) -> int:
        """How many problems `op` has in this domain, held-out ones included."""
        return {"+": (self.add_max + 1) ** 2, "-": (self.sub_max + 1) * (self.sub_max + 2) // 2,
                "*": (self.mul_max + 1) ** 2, "/": self.div_max * (self.div_max + 1)}[op]

    def every(self, op: str) -> list[tuple[int, str, int]]:
        """Every problem of `op`, held-out ones included, in a fixed order."""
        if op == "+":
            return [(a, op, b) for a in range(self.add_max + 1) for b in range(self.add_max + 1)]
        if op == "-":
            return [(a, op, b) for a in range(self.sub_max + 1) for b in range(a + 1)]
        if op == "*":
            return [(a, op, b) for a in range(self.mul_max + 1) for b in range(self.mul_max + 1)]
        return [(b * q, op, b) for b in range(1, self.div_max + 1) for q in range(self.div_max + 1)]

    def population(self, op: str, split: str, part: str | None, limit: int) -> list[tuple[int, str, int]] | None:
        """Every problem of `op` in `split` ('train', or 'heldout' with half `part`, None = both)
        when there are at most `limit` of them, else None: then the evaluation samples instead.
        Scoring a whole set counts each problem once: 400 draws with replacement miss ~9% of the
        169 times-table facts, and draws of '-' (a uniform, then b <= a) gave one held-out fact,
        5 - 4, 4% of the reported held-out score (seed 5, RESULTS.md issue 9, fifth pass)."""
        expected = self.count(op) if split == "train" else self.count(op) * self.heldout_fraction / (2 if part else 1)
        if expected > 2 * limit:  # certainly too many: do not enumerate a large domain
            return None
        keep = [p for p in self.every(op) if self.in_split(p, split, part)]
        return keep if len(keep) <= limit else None

    def in_split(self, problem: tuple[int, str, int], split: str, part: str | None = None) -> bool:
        """Whether `problem` is in `split` ('train' or 'heldout'), and in half `part` if one is given."""
        return is_heldout(*problem, self.heldout_fraction) == (split == "heldout") and (
            part is None or heldout_part(*problem, self.heldout_fraction) == part)

    def heldout_halves(self, op: str) -> bool:
        """Whether both halves of the held-out `op` problems are non-empty (a tiny domain may have
        too few held-out problems to split; then val and test both use all of them)."""
        hi = self.add_max if op == "+" else self.sub_max
        if op not in "+-" or self.heldout_fraction <= 0:
            return False
        if (hi + 1) ** 2 > 1_000_000:  # large domains: both halves are certainly populated
            return True
        parts = {heldout_part(*p, self.heldout_fraction) for p in self.every(op) if self.in_split(p, "heldout")}
        return parts == {"val", "test"}

    def sample(self, n: int, g: torch.Generator, split: str, ops: str | None = None,
               part: str | None = None) -> list[tuple[int, str, int]]:
        """n problems (a, op, b). split 'train' never yields held-out problems; 'heldout' yields only
        them, and with part='val' or 'test' only that half (see heldout_part)."""
        training_mix = ops is None and split == "train"  # training batches; evaluation sets stay uniform
        weights = self.operator_weights if training_mix else None
        ops = ops or self.operators
        if split == "heldout":
            ops = "".join(o for o in ops if o in "+-")
            if not ops or self.heldout_fraction <= 0:
                return []
        out, tries = [], 0
        while len(out) < n:
            tries += 1
            if tries > 1000 * n + 10_000:  # e.g. a one-problem domain whose only problem is held out
                raise ValueError(f"cannot draw {split} problems for {ops!r} from this domain; "
                                 "widen the operand ranges or change heldout_fraction")
            if weights:
                op = ops[int(torch.multinomial(torch.tensor(weights), 1, generator=g))]
            else:
                op = ops[int(torch.randint(0, len(ops), (1,), generator=g))]
            a, b = self.sample_one(op, g, training_mix)
            if self.in_split((a, op, b), split, part):
                out.append((a, op, b))
        return out


def encode_problems(problems, tok: CharTokenizer, answer_only: bool = True, length: int = 0, domain=None):
    """Right-padded (x, y) for next-token training; y is -100 outside the answer (or the padding).
    `length` pads to at least that many positions (fixed shapes keep torch.compile from recompiling)."""
    seqs, starts = [], []
    dom = domain or ArithmeticDomain()
    for a, op, b in problems:
        prompt = dom.prompt(a, op, b)
        ids = tok.encode(f"{prompt} {dom.written_answer(a, op, b)}\n")
        seqs.append(ids)
        starts.append(len(prompt))  # position of '=': it predicts the space, so greedy decoding from 'a op b =' works
    T = max(length, max(len(s) for s in seqs) - 1)
    x = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        s = torch.tensor(s)
        x[i, : len(s) - 1] = s[:-1]
        first = st if answer_only else 0  # y[t] is the token after x[t]
        y[i, first : len(s) - 1] = s[first + 1 :]
    return x, y


class ArithmeticTask:
    """What the shared trainer needs from an experiment: batches, evaluation, identity."""

    name = "arithmetic"

    def __init__(self, cfg):
        self.cfg = cfg
        self.tok = CharTokenizer()
        self.domain = ArithmeticDomain.from_config(cfg)
        # whether each operator's held-out problems split into val/test halves: fixed by the domain, so once
        self.splits_heldout = {op: self.domain.heldout_halves(op) for op in "+-"}
        # the sets small enough to score whole at each evaluation, keyed (split, half, op): by default
        # the times tables ('train') and the halves of the held-out '-' problems; None = sampled
        self.whole_sets = {}
        for _, split, part, _ in self.eval_sets:
            for op in self.eval_ops(split):
                key = self.set_key(split, part, op)
                if key not in self.whole_sets:
                    self.whole_sets[key] = self.domain.population(op, key[0], key[1], cfg.eval_problems)
        if cfg.vocab_size != self.tok.vocab_size:
            raise ValueError(f"vocab_size must be {self.tok.vocab_size} for arithmetic, got {cfg.vocab_size}")
        if self.domain.max_length() > cfg.max_position_embeddings:
            raise ValueError(f"max_position_embeddings {cfg.max_position_embeddings} is shorter than the longest problem "
                             f"({self.domain.max_length()} tokens); pass --set max_position_embeddings={self.domain.max_length()} "
                             f"or smaller operand ranges")

    def identity(self) -> dict:
        ident = {"task": self.name, "tokenizer": self.tok.identity}
        if self.domain.pad_numbers:
            ident["number_format"] = self.domain.number_format()
        if self.domain.reverse_answers:
            ident["reverse_answers"] = True  # the tools put a completion's digits back in order
        return ident

    @staticmethod
    def codec(identity: dict) -> ArithmeticCodec:
        """The codec of a checkpoint with this identity (tasks.codec_for)."""
        if identity.get("tokenizer") != CharTokenizer.identity:
            raise ValueError(f"checkpoint tokenizer {identity.get('tokenizer')!r} is not this version's "
                             f"{CharTokenizer.identity!r}")
        return ArithmeticCodec(identity.get("number_format") or {}, bool(identity.get("reverse_answers")))

    @classmethod
    def from_checkpoint(cls, cfg, identity: dict):
        """The task as it trained, from the checkpoint's config alone (tasks.task_from_checkpoint)."""
        return cls(cfg)

    @staticmethod
    def heldout_documents(cfg, n: int) -> list[str]:
        """n held-out problems written as the run trained on them ('12 * 3 = 36'), for check_model."""
        dom = ArithmeticDomain.from_config(cfg)
        problems = dom.sample(n, torch.Generator().manual_seed(0), "val")
        return [f"{dom.prompt(a, op, b)} {dom.written_answer(a, op, b)}" for a, op, b in problems]

    @staticmethod
    def identity_of_tokenizer(tokenizer_json: str) -> dict | None:
        """A transformers folder whose tokenizer is our character vocabulary holds an arithmetic model."""
        from tokenizers import Tokenizer

        chars = CharTokenizer()
        return {"task": ArithmeticTask.name, "tokenizer": chars.identity} \
            if Tokenizer.from_str(tokenizer_json).get_vocab() == chars.stoi else None

    def get_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)  # stateless: resumes exactly
        return encode_problems(self.domain.sample(batch_size, g, "train"), self.tok, self.cfg.train_on == "answer",
                               length=self.domain.max_length(), domain=self.domain)

    @torch.no_grad()
    def accuracy(self, model, problems, device) -> tuple[list[bool], float]:
        """Exact match of the greedy answer, computed teacher-forced in one pass: greedy decoding
        yields the target exactly when the argmax is right at every answer position."""
        x, y = encode_problems(problems, self.tok, answer_only=True, domain=self.domain)
        x, y = x.to(device), y.to(device)
        logits, loss = model(x, y)
        hit = (logits.argmax(-1) == y) | (y == -100)
        return hit.all(dim=1).tolist(), float(loss)

    # (name, split, held-out half, sampling seed) of each evaluation set, see evaluate()
    eval_sets = (("indist", "train", None, 12345), ("heldout", "heldout", "test", 12345),
                 ("val", "train", None, 54321), ("val_heldout", "heldout", "val", 54321))

    def eval_ops(self, split: str) -> list[str]:
        """The operators an evaluation set of `split` scores: only '+'/'-' have held-out problems."""
        return [o for o in self.domain.operators if split == "train" or (o in "+-" and self.domain.heldout_fraction > 0)]

    def set_key(self, split: str, part: str | None, op: str) -> tuple:
        """(split, half, op) of the problems a set draws; a domain too small to split its held-out
        problems gives both halves all of them (half None)."""
        return split, part if part and self.splits_heldout[op] else None, op

    def evaluate(self, model, device, step: int) -> dict:
        """Exact match per operator on three sets, the same problems at every evaluation:
        indist (training distribution) and heldout (the 'test' half of the held-out problems) are
        reported; val (other in-distribution draws plus the 'val' half of the held-out problems)
        only decides when a run is solved (see solved()), so the reported figures never steer it.
        A set of at most eval_problems problems (the times tables, each half of the held-out '-'
        problems) is scored whole instead of sampled; indist and val then share the training table."""
        metrics, scored = {}, {}  # scored: a whole set's result, shared by the splits that use it
        for name, split, part, seed in self.eval_sets:
            g = torch.Generator().manual_seed(seed)
            all_hits, losses = [], []
            for op in self.eval_ops(split):
                key = self.set_key(split, part, op)
                if self.whole_sets[key] is not None:
                    # a whole set is the population itself: the same problems whoever asks, so scored once
                    if key not in scored:
                        scored[key] = self.accuracy(model, self.whole_sets[key], device)
                    hits, loss = scored[key]
                else:
                    problems = self.domain.sample(self.cfg.eval_problems, g, split, ops=op, part=key[1])
                    hits, loss = self.accuracy(model, problems, device)
                metrics[f"{name}_acc_{op}"] = sum(hits) / len(hits)
                all_hits += hits
                losses.append(loss)
            if all_hits and not name.startswith("val"):
                metrics[f"{name}_acc"] = sum(all_hits) / len(all_hits)
                metrics[f"{name}_answer_loss"] = sum(losses) / len(losses)
        metrics["val_loss"] = metrics["indist_answer_loss"]
        metrics["samples"] = self.sample_lines(model, device, torch.Generator().manual_seed(12345))
        return metrics

    solve_target = 0.995  # solved(): every operator on the validation sets; the reported bar is 99%

    def solved(self, m: dict) -> bool:
        """True when every operator scores >= solve_target on the validation sets (never the
        reported ones): the trainer may stop there (stop_when_solved)."""
        vals = [v for k, v in m.items() if k.startswith("val_acc_") or k.startswith("val_heldout_acc_")]
        return bool(vals) and min(vals) >= self.solve_target

    # --- what the diagnosis needs (see bitnet.diagnose; its rules live in diagnose/rules.py) ---
    # val_loss here is the answer loss, which "answers are digits" alone pushes below the
    # ln(vocab) margin, so learning also asks for some exact answers.
    thresholds = {"metric": "indist_acc", "min_metric": 0.1, "seed_loss": 0.5,
                  "loss_name": "answer loss (cross-entropy on the answer tokens, teacher-forced, in-distribution set)",
                  "bar_name": ">= 99% exact match on every operator, in-distribution and held-out"}
    learning_kwargs = {"metric": thresholds["metric"], "min_metric": thresholds["min_metric"]}
    metric_keys = ["indist_acc", "heldout_acc", "indist_acc_+", "indist_acc_-", "indist_acc_*", "indist_acc_/",
                   "heldout_acc_+", "heldout_acc_-"]

    def milestones(self) -> dict[str, float]:
        ln_v, uni = math.log(self.tok.vocab_size), unigram_loss(self.get_batch)
        return {f"ln(vocab) {ln_v:.2f}": ln_v, f"unigram {uni:.2f}": uni, "0.1": 0.1, "0.01": 0.01}

    def diagnosis_inputs(self, model) -> dict:
        return {"arithmetic_answers": arithmetic_answers(self, model), "batch": self.get_batch(0, 16)}

    def format_eval(self, m: dict) -> str:
        def accs(prefix):
            return " ".join(f"{op} {m[f'{prefix}_acc_{op}']:.1%}" for op in "+-*/" if f"{prefix}_acc_{op}" in m)
        line = f"answer loss {m['indist_answer_loss']:.4f} | in-dist acc {m['indist_acc']:.1%} ({accs('indist')})"
        if "heldout_acc" in m:
            line += f" | held-out acc {m['heldout_acc']:.1%} ({accs('heldout')})"
        return line

    def passed(self, m: dict, target: float = 0.99) -> tuple[bool, list[str]]:
        """The seed's success criteria: >= 99% on every operator in-distribution, and on held-out +/-."""
        failures = [f"{k} = {v:.1%} < {target:.0%}" for k, v in m.items()
                    if (k.startswith("indist_acc_") or k.startswith("heldout_acc_")) and v < target]
        return not failures, failures

    @torch.no_grad()
    def sample_lines(self, model, device, g, n_per_op: int = 2) -> list[str]:
        """Greedy completions of a few prompts, marked right or wrong, as the seed prints them:
        '5 + 3 = 8  ok', written as a person writes it whatever the training format."""
        codec = self.codec(self.identity())
        lines = []
        for op in self.domain.operators:
            for a, op_, b in self.domain.sample(n_per_op, g, "train", ops=op):
                prompt = self.domain.prompt(a, op_, b)
                written = self.greedy(model, prompt, device)
                ok = written.strip() == self.domain.written_answer(a, op_, b)
                line = codec.display(prompt + written.rstrip("\n"))
                lines.append(f"{line}  {'ok' if ok else f'WRONG, want {solve(a, op_, b)}'}")
        return lines

    def prompt_ids(self, prompt: str) -> list[int]:
        """How inference encodes a prompt (complete(), the diagnosis' greedy answers)."""
        return self.tok.encode(prompt)

    def prompt_of_row(self, row: list[int]) -> str | None:
        """The prompt ('07 + 12 =') of a training row, as text; None when the row has none."""
        text = self.tok.decode(row)
        return text[:text.index("=") + 1] if "=" in text else None

    def greedy(self, model, prompt: str, device, max_new_tokens: int = 8) -> str:
        """The model's own greedy completion of a training-format prompt ('07 + 12 =' -> ' 910\\n')."""
        ids = torch.tensor([self.prompt_ids(prompt)], device=device)
        out = model.generate(ids, max_new_tokens, stop_token=self.tok.newline_id)
        return self.tok.decode(out[0, ids.shape[1]:].tolist())

    def complete(self, model, prompt: str, device, max_new_tokens: int = 8) -> str:
        """The greedy completion with its digits in the usual order (' 019\\n'), still padded."""
        return read_answer(self.greedy(model, prompt, device, max_new_tokens), self.domain.reverse_answers)


# --- inputs of the diagnosis, computed where their data lives ---

def arithmetic_answers(task, model, per_operator: int = 5) -> list[str]:
    """Greedy answers to a few training-distribution problems. The prompt includes the space
    after '=': checkpoints trained before that space became a target (data_arithmetic before
    0425256) never learned to emit it, and would otherwise look like they answer nothing."""
    g = torch.Generator().manual_seed(12345)
    device = next(model.parameters()).device
    return [task.complete(model, task.domain.prompt(a, op, b).rstrip() + " ", device)
            for op in task.domain.operators for a, _, b in task.domain.sample(per_operator, g, "train", ops=op)]
