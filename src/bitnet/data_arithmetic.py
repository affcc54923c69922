"""Synthetic arithmetic: problems like `12 + 7 = 19`, a 32-token character tokenizer,
and the held-out split that shows generalisation rather than memory.

Default domain (the seed's): '+' and '-' with operands 0-99 (subtraction never
negative), '*' the times tables 0-12, '/' exact (a = b*c, divisor b 1-12, quotient
c 0-12). Every range is a config field. A fixed share of the '+'/'-' problems is held
out by a hash of the problem itself, so it can never reach a training batch whatever
the seed.
"""
import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list("0123456789+-*/= \n")
RESERVED = [f"<r{i}>" for i in range(32 - len(SPECIALS) - len(CHARS))]  # keeps the seed's vocab of 32


class CharTokenizer:
    """Character tokenizer for arithmetic: 4 specials, digits, `+ - * / =`, space, newline."""

    identity = "arith-char32-v1"  # stored in checkpoints; change it if the vocabulary changes

    def __init__(self):
        self.itos = SPECIALS + CHARS + RESERVED
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.newline_id = self.stoi["\n"]

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        bad = sorted({c for c in text if c not in self.stoi})
        if bad:
            raise ValueError(f"characters {bad!r} are not in the arithmetic vocabulary (digits, '+-*/=', space)")
        return ([self.bos_id] if bos else []) + [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(SPECIALS) and self.itos[i] in CHARS)


PROBLEM_RE = re.compile(r"^\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)\s*$")


def parse_problem(line: str) -> tuple[int, str, int, int]:
    """'12 + 7 = 19' -> (12, '+', 7, 19). Raises ValueError on anything else."""
    m = PROBLEM_RE.match(line)
    if not m:
        raise ValueError("expected a problem like '12 + 7 = 19'")
    return int(m[1]), m[2], int(m[3]), int(m[4])


def format_prompt(a: int, op: str, b: int) -> str:
    return f"{a} {op} {b} ="


def solve(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]


def is_heldout(a: int, op: str, b: int, fraction: float) -> bool:
    """Deterministic, seed-independent split: a multiplicative hash of the problem."""
    if op not in "+-" or fraction <= 0:
        return False
    h = ((a * 1_000_003 + b * 7_919 + (op == "-") * 104_729) * 2_654_435_761) % 2**32
    return h / 2**32 < fraction


@dataclass
class ArithmeticDomain:
    add_max: int = 99
    sub_max: int = 99
    mul_max: int = 12
    div_max: int = 12
    operators: str = "+-*/"
    heldout_fraction: float = 0.1
    operator_weights: tuple[float, ...] = ()  # training mix; () = equal

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
        dom = cls(cfg.add_max, cfg.sub_max, cfg.mul_max, cfg.div_max, cfg.operators, cfg.heldout_fraction, weights)
        if min(dom.add_max, dom.sub_max, dom.mul_max) < 0 or dom.div_max < 1:
            raise ValueError("operand ranges must be >= 0 (div_max >= 1)")
        if not 0 <= dom.heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in [0, 1)")
        return dom

    def max_length(self) -> int:
        """Input positions of the longest training sequence: <bos> + `a op b = c` + newline, minus
        the one that is only a target."""
        widest = {"+": (self.add_max, self.add_max, 2 * self.add_max), "-": (self.sub_max, self.sub_max, self.sub_max),
                  "*": (self.mul_max, self.mul_max, self.mul_max ** 2),
                  "/": (self.div_max ** 2, self.div_max, self.div_max)}
        return max(sum(len(str(n)) for n in widest[op]) + len(" + ") + len(" = ") + len("\n") for op in self.operators)

    def sample_one(self, op: str, g: torch.Generator) -> tuple[int, int]:
        def r(hi: int) -> int:  # uniform integer in [0, hi]
            return int(torch.randint(0, hi + 1, (1,), generator=g))

        if op == "+":
            return r(self.add_max), r(self.add_max)
        if op == "-":
            a = r(self.sub_max)
            return a, r(a)  # b <= a: never negative
        if op == "*":
            return r(self.mul_max), r(self.mul_max)
        b = 1 + r(self.div_max - 1)  # divisor 1..div_max
        return b * r(self.div_max), b  # exact: a = b * quotient

    def sample(self, n: int, g: torch.Generator, split: str, ops: str | None = None) -> list[tuple[int, str, int]]:
        """n problems (a, op, b). split 'train' never yields held-out problems; 'heldout' yields only them."""
        weights = self.operator_weights if ops is None and split == "train" else None
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
            a, b = self.sample_one(op, g)
            if is_heldout(a, op, b, self.heldout_fraction) == (split == "heldout"):
                out.append((a, op, b))
        return out


def encode_problems(problems, tok: CharTokenizer, answer_only: bool = True, length: int = 0):
    """Right-padded (x, y) for next-token training; y is -100 outside the answer (or the padding).
    `length` pads to at least that many positions (fixed shapes keep torch.compile from recompiling)."""
    seqs, starts = [], []
    for a, op, b in problems:
        prompt = format_prompt(a, op, b)
        ids = tok.encode(f"{prompt} {solve(a, op, b)}\n")
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
        if cfg.vocab_size != self.tok.vocab_size:
            raise ValueError(f"vocab_size must be {self.tok.vocab_size} for arithmetic, got {cfg.vocab_size}")

    def identity(self) -> dict:
        return {"task": self.name, "tokenizer": self.tok.identity}

    def get_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)  # stateless: resumes exactly
        return encode_problems(self.domain.sample(batch_size, g, "train"), self.tok, self.cfg.train_on == "answer",
                               length=self.domain.max_length())

    @torch.no_grad()
    def accuracy(self, model, problems, device) -> tuple[list[bool], float]:
        """Exact match of the greedy answer, computed teacher-forced in one pass: greedy decoding
        yields the target exactly when the argmax is right at every answer position."""
        x, y = encode_problems(problems, self.tok, answer_only=True)
        x, y = x.to(device), y.to(device)
        logits, loss = model(x, y)
        hit = (logits.argmax(-1) == y) | (y == -100)
        return hit.all(dim=1).tolist(), float(loss)

    def evaluate(self, model, device, step: int) -> dict:
        g = torch.Generator().manual_seed(12345)  # the same evaluation problems every time
        n = self.cfg.eval_problems
        metrics, total = {}, {}
        for split in ("train", "heldout"):
            name = "indist" if split == "train" else "heldout"
            ops = self.domain.operators if split == "train" else [o for o in self.domain.operators if o in "+-" and self.domain.heldout_fraction > 0]
            all_hits, losses = [], []
            for op in ops:
                problems = self.domain.sample(n, g, split, ops=op)
                hits, loss = self.accuracy(model, problems, device)
                metrics[f"{name}_acc_{op}"] = sum(hits) / len(hits)
                all_hits += hits
                losses.append(loss)
            if all_hits:
                metrics[f"{name}_acc"] = sum(all_hits) / len(all_hits)
                metrics[f"{name}_answer_loss"] = sum(losses) / len(losses)
                total[name] = metrics[f"{name}_acc"]
        metrics["val_loss"] = metrics["indist_answer_loss"]
        metrics["samples"] = self.sample_lines(model, device, g)
        return metrics

    # --- what the diagnosis needs (see bitnet.diagnose) ---
    # val_loss here is the answer loss, which "answers are digits" alone pushes below the
    # ln(vocab) margin, so learning also asks for some exact answers.
    learning_kwargs = {"metric": "indist_acc", "min_metric": 0.1}
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
        """Greedy completions of a few prompts, marked right or wrong, as the seed prints them."""
        lines = []
        for op in self.domain.operators:
            for a, op_, b in self.domain.sample(n_per_op, g, "train", ops=op):
                got = self.complete(model, format_prompt(a, op_, b), device)
                ok = got.strip() == str(solve(a, op_, b))
                lines.append(f"{format_prompt(a, op_, b)}{got.rstrip()}  {'ok' if ok else 'WRONG, want ' + str(solve(a, op_, b))}")
        return lines

    def complete(self, model, prompt: str, device, max_new_tokens: int = 8) -> str:
        ids = torch.tensor([self.tok.encode(prompt)], device=device)
        out = model.generate(ids, max_new_tokens, stop_token=self.tok.newline_id)
        return self.tok.decode(out[0, ids.shape[1]:].tolist())


# --- inputs of the diagnosis, computed where their data lives ---

def unigram_loss(get_batch, n_batches: int = 20, batch_size: int = 32) -> float:
    """Cross-entropy of the best context-free guess (the training targets' own frequencies):
    a model that beats it has learned something beyond token counts."""
    counts = Counter()
    for step in range(n_batches):
        _, y = get_batch(step, batch_size)
        counts.update(y[y != -100].tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def arithmetic_answers(task, model, per_operator: int = 5) -> list[str]:
    """Greedy answers to a few training-distribution problems. The prompt includes the space
    after '=': checkpoints trained before that space became a target (data_arithmetic before
    0425256) never learned to emit it, and would otherwise look like they answer nothing."""
    g = torch.Generator().manual_seed(12345)
    device = next(model.parameters()).device
    return [task.complete(model, format_prompt(a, op, b).rstrip() + " ", device)
            for op in task.domain.operators for a, _, b in task.domain.sample(per_operator, g, "train", ops=op)]
