"""The arithmetic task: what the trainer runs on problems like `12 + 7 = 19` (the problems and
their held-out split: arithmetic_problems.py; their text and the 32-token character tokenizer:
arithmetic_codec.py).
"""
import math

import torch

from .arithmetic_codec import ArithmeticCodec, CharTokenizer, read_answer
from .arithmetic_problems import ArithmeticDomain, encode_problems, solve
from .taskkit import unigram_loss


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
