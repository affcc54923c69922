"""The arithmetic generator, tokenizer and held-out split, checked by decoding what the
trainer is actually fed and recomputing every answer independently."""
import operator
import re

import pytest
import torch

from bitnet.config_tiny import BitNetConfigArithmetic
from bitnet.arithmetic_codec import CharTokenizer, parse_problem
from bitnet.arithmetic_problems import ArithmeticDomain, encode_problems, heldout_part, is_heldout
from bitnet.data_arithmetic import ArithmeticTask

TOK = CharTokenizer()
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def right_answer(a: int, op: str, b: int) -> int:
    if op == "/":
        assert b != 0 and a % b == 0, f"{a} / {b} is not exact"
        return a // b
    return OPS[op](a, b)


def decode_batch(x: torch.Tensor, y: torch.Tensor) -> list[tuple[int, str, int, int]]:
    """(a, op, b, c) for every row: the input row plus its last label is the full line."""
    out = []
    for xr, yr in zip(x.tolist(), y.tolist()):
        ids = [t for t in xr if t != TOK.pad_id]
        last = [t for t in yr if t != -100][-1]
        assert last == TOK.newline_id
        text = "".join(TOK.itos[t] for t in ids[1:] + [last])  # ids[0] is <bos>
        assert ids[0] == TOK.bos_id and text.endswith("\n") and text.count("\n") == 1
        out.append(parse_problem(text))
    return out


class Echo:
    """A stand-in model whose greedy completion of every prompt is `answer`, as the model writes it."""

    def __init__(self, answer: str):
        self.tail = torch.tensor([TOK.encode(f" {answer}\n", bos=False)])

    def generate(self, ids, max_new_tokens, stop_token=None, **_):
        return torch.cat([ids, self.tail], dim=1)


def problems_of(cfg, steps=range(40), batch_size=128):
    task = ArithmeticTask(cfg)
    seen = []
    for step in steps:
        seen += decode_batch(*task.get_batch(step, batch_size))
    return task, seen


# ---------------------------------------------------------------- tokenizer and parsing
def test_tokenizer_has_32_tokens_and_round_trips():
    assert TOK.vocab_size == 32 == BitNetConfigArithmetic().vocab_size
    assert len(set(TOK.itos)) == 32
    for ch in "0123456789+-*/= \n":
        assert ch in TOK.stoi
    text = "12 + 7 = 19\n"
    ids = TOK.encode(text)
    assert ids[0] == TOK.bos_id and len(ids) == len(text) + 1
    assert TOK.decode(ids) == text
    with pytest.raises(ValueError, match="vocabulary"):
        TOK.encode("1 % 2 = 1")


def test_parse_problem():
    assert parse_problem("12 + 7 = 19") == (12, "+", 7, 19)
    assert parse_problem(" 3*4=12 \n") == (3, "*", 4, 12)
    for bad in ("12 + = 19", "a + 1 = 2", "1 + 2", ""):
        with pytest.raises(ValueError):
            parse_problem(bad)


# ---------------------------------------------------------------- the generator
def check_domain(seen, add_max, sub_max, mul_max, div_max, ops="+-*/"):
    by_op = {op: [(a, b) for a, o, b, _ in seen if o == op] for op in ops}
    assert set(o for _, o, _, _ in seen) == set(ops)
    for a, op, b, c in seen:
        assert c == right_answer(a, op, b), f"{a} {op} {b} = {c} is wrong"
    if "+" in ops:
        assert {a for a, _ in by_op["+"]} | {b for _, b in by_op["+"]} == set(range(add_max + 1))
    if "-" in ops:
        assert all(0 <= b <= a <= sub_max for a, b in by_op["-"]), "negative subtraction or out of range"
        assert max(a for a, _ in by_op["-"]) == sub_max and min(b for _, b in by_op["-"]) == 0
    if "*" in ops:
        assert {a for a, _ in by_op["*"]} == {b for _, b in by_op["*"]} == set(range(mul_max + 1))
    if "/" in ops:
        assert {b for _, b in by_op["/"]} == set(range(1, div_max + 1)), "divisor range"
        assert {a // b for a, b in by_op["/"]} == set(range(div_max + 1)), "quotient range"


def test_default_domain_from_training_batches():
    cfg = BitNetConfigArithmetic()
    assert (cfg.add_max, cfg.sub_max, cfg.mul_max, cfg.div_max, cfg.operators) == (99, 99, 12, 12, "+-*/")
    _, seen = problems_of(cfg)
    check_domain(seen, 99, 99, 12, 12)
    counts = {op: sum(o == op for _, o, _, _ in seen) for op in "+-*/"}
    assert min(counts.values()) > 0.2 * len(seen)  # every operator is trained on, about evenly


def test_custom_domain_from_config_overrides():
    cfg = BitNetConfigArithmetic().with_overrides(
        ["add_max=5", "sub_max=300", "mul_max=99", "div_max=20", "operators=-*/"])
    _, seen = problems_of(cfg, steps=range(60))
    check_domain(seen, 5, 300, 99, 20, ops="-*/")
    assert max(c for _, o, _, c in seen if o == "*") > 1000  # two-digit multiplication is a config change


def test_domain_validation():
    for bad in (["operators=+%"], ["operators="], ["heldout_fraction=1.0"], ["div_max=0"], ["add_max=-1"]):
        with pytest.raises(ValueError):
            ArithmeticTask(BitNetConfigArithmetic().with_overrides(bad))
    with pytest.raises(ValueError, match="vocab_size"):
        ArithmeticTask(BitNetConfigArithmetic(vocab_size=64))


def test_batches_are_a_pure_function_of_seed_and_step():
    task = ArithmeticTask(BitNetConfigArithmetic())
    a, b = task.get_batch(7, 16), task.get_batch(7, 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(task.get_batch(8, 16)[0], a[0])
    other = ArithmeticTask(BitNetConfigArithmetic(seed=1))
    assert not torch.equal(other.get_batch(7, 16)[0], a[0])


# ---------------------------------------------------------------- the held-out split
def test_heldout_problems_never_reach_training_batches():
    cfg = BitNetConfigArithmetic(add_max=20, sub_max=20)
    domain = ArithmeticDomain.from_config(cfg)
    full = {(a, "+", b) for a in range(21) for b in range(21)} | {(a, "-", b) for a in range(21) for b in range(a + 1)}
    heldout = {p for p in full if is_heldout(*p, cfg.heldout_fraction)}
    assert heldout and heldout != full
    seen = set()
    for seed in (1, 2):  # the split does not depend on the seed
        _, problems = problems_of(BitNetConfigArithmetic(add_max=20, sub_max=20, operators="+-", seed=seed),
                                  steps=range(60))
        seen |= {(a, op, b) for a, op, b, _ in problems if op in "+-"}
    assert not seen & heldout, f"held-out problems in training batches: {sorted(seen & heldout)[:5]}"
    assert seen == full - heldout  # and everything else is trained on
    # the evaluation's held-out split draws only from the held-out set, every problem of it
    drawn = set(domain.sample(600, gen(0), "heldout"))
    assert drawn == heldout


def test_heldout_split_size_is_about_the_fraction():
    cfg = BitNetConfigArithmetic()  # the default 0-99 domain
    for op, pairs in (("+", [(a, b) for a in range(100) for b in range(100)]),
                      ("-", [(a, b) for a in range(100) for b in range(a + 1)])):
        share = sum(is_heldout(a, op, b, cfg.heldout_fraction) for a, b in pairs) / len(pairs)
        assert abs(share - cfg.heldout_fraction) < 0.02, f"{op}: {share:.3f} held out"
    for frac in (0.05, 0.3):
        share = sum(is_heldout(a, "+", b, frac) for a in range(100) for b in range(100)) / 1e4
        assert abs(share - frac) < 0.02
    assert not any(is_heldout(a, op, b, 0.5) for a in range(13) for b in range(1, 13) for op in "*/")
    assert not any(is_heldout(a, "+", b, 0.0) for a in range(100) for b in range(100))


def test_evaluation_reports_both_splits_and_skips_heldout_when_fraction_is_zero(tiny_model_cfg):
    from bitnet.model import BitNetForCausalLM
    for frac, want_heldout in ((0.1, True), (0.0, False)):
        cfg = BitNetConfigArithmetic(**{**tiny_model_cfg().__dict__, "operators": "+*", "add_max": 9,
                                        "mul_max": 5, "heldout_fraction": frac, "eval_problems": 8})
        model = BitNetForCausalLM(cfg).eval()
        m = ArithmeticTask(cfg).evaluate(model, "cpu", step=0)
        assert {"indist_acc_+", "indist_acc_*", "indist_answer_loss", "val_loss", "samples"} <= set(m)
        assert ("heldout_acc_+" in m) == want_heldout and "heldout_acc_*" not in m


def test_every_problem_of_each_operator_is_listed_once_and_correctly():
    domain = ArithmeticDomain.from_config(BitNetConfigArithmetic())
    for op in "+-*/":
        every = domain.every(op)
        assert len(every) == len(set(every)) == domain.count(op)
        for a, o, b in every:  # inside the ranges, never negative, '/' exact
            assert o == op and right_answer(a, op, b) >= 0
    assert sorted(len(domain.every(op)) for op in "+-*/") == [156, 169, 5050, 10000]


def test_small_sets_are_scored_whole_and_one_wrong_fact_counts_once(tiny_model_cfg, monkeypatch):
    from bitnet.model import BitNetForCausalLM
    cfg = BitNetConfigArithmetic(**{**tiny_model_cfg().__dict__, "eval_problems": 300})
    task = ArithmeticTask(cfg)
    whole = task.whole_sets
    assert whole["train", None, "+"] is None and whole["train", None, "-"] is None  # 9,000 and ~4,500: sampled
    assert len(set(whole["train", None, "*"])) == 169 and len(set(whole["train", None, "/"])) == 156
    assert whole["heldout", "test", "+"] is None  # ~500 held-out sums per half: sampled
    halves = {part: {(a, "-", b) for a in range(100) for b in range(a + 1)
                     if is_heldout(a, "-", b, 0.1) and heldout_part(a, "-", b, 0.1) == part} for part in ("val", "test")}
    assert {part: set(whole["heldout", part, "-"]) for part in halves} == halves  # each half of '-', all of it
    test_fact = sorted(halves["test"])[0]
    scored = []

    def accuracy(model, problems, device):  # every answer right except 7 * 8 and one held-out difference
        scored.append(list(problems))
        return [p not in ((7, "*", 8), test_fact) for p in problems], 0.1

    monkeypatch.setattr(task, "accuracy", accuracy)
    m = task.evaluate(BitNetForCausalLM(cfg).eval(), "cpu", step=0)
    assert m["indist_acc_*"] == m["val_acc_*"] == 168 / 169 and m["indist_acc_/"] == m["val_acc_/"] == 1.0
    assert m["heldout_acc_-"] == 1 - 1 / len(halves["test"]) and m["val_heldout_acc_-"] == 1.0  # once, not by its draw weight
    assert m["indist_acc_+"] == m["heldout_acc_+"] == 1.0
    assert sum(set(s) == set(whole["train", None, "*"]) for s in scored) == 1  # scored once, shared by indist and val
    assert not task.solved(m)  # 99.4% >= the 99% bar, but a fact is wrong: not solved
    assert ArithmeticTask(BitNetConfigArithmetic(eval_problems=100)).whole_sets["train", None, "*"] is None  # a sample then


def test_heldout_halves_are_disjoint_and_the_reported_half_never_steers_the_stop():
    cfg = BitNetConfigArithmetic()
    domain = ArithmeticDomain.from_config(cfg)
    for op, pairs in (("+", [(a, b) for a in range(100) for b in range(100)]),
                      ("-", [(a, b) for a in range(100) for b in range(a + 1)])):
        held = [(a, op, b) for a, b in pairs if is_heldout(a, op, b, cfg.heldout_fraction)]
        val = {p for p in held if heldout_part(*p, cfg.heldout_fraction) == "val"}
        test = {p for p in held if heldout_part(*p, cfg.heldout_fraction) == "test"}
        assert val and test and not val & test and val | test == set(held)
        assert 0.35 < len(val) / len(held) < 0.65, f"{op}: {len(val)} of {len(held)} in the val half"
        assert domain.heldout_halves(op)
        assert set(domain.sample(300, gen(1), "heldout", ops=op, part="test")) <= test
        assert set(domain.sample(300, gen(2), "heldout", ops=op, part="val")) <= val


def test_solved_reads_only_the_validation_sets():
    task = ArithmeticTask(BitNetConfigArithmetic())
    good = {"val_acc_+": 1.0, "val_acc_*": 0.996, "val_heldout_acc_+": 1.0}
    assert task.solved(good)
    assert not task.solved({**good, "val_heldout_acc_+": 0.99})  # below the 99.5% stop target
    assert task.solved({**good, "heldout_acc_+": 0.0, "indist_acc_-": 0.0})  # reported figures never steer it
    assert not task.solved({"indist_acc_+": 1.0})  # no validation figures: not solved


def test_balanced_digit_sampling_gives_short_operands_their_share():
    def short_share(balance, **kw):
        cfg = BitNetConfigArithmetic(operators="+", balance_digits=balance)
        ps = ArithmeticDomain.from_config(cfg).sample(3000, gen(0), **kw)
        return sum(a < 10 for a, _, _ in ps) / len(ps)
    assert short_share(0.0, split="train") < 0.15  # uniform: 10% of operands are 1-digit
    assert 0.4 < short_share(1.0, split="train") < 0.6  # balanced: half
    # evaluation sets (an explicit operator, or held-out problems) stay uniform whatever the training mix
    assert short_share(1.0, split="train", ops="+") < 0.15 and short_share(1.0, split="heldout", ops="+") < 0.15
    with pytest.raises(ValueError, match="balance_digits"):
        ArithmeticTask(BitNetConfigArithmetic(balance_digits=1.5))


# the end-of-run conclusion (seed criteria, bar, verdict -> OVERALL) is a verdict rule now:
# tests/test_diagnose.py::test_overall_word_follows_the_verdict_and_the_bar


# ---------------------------------------------------------------- training targets
def test_encode_problems_labels_the_answer_only():
    problems = [(12, "+", 7), (3, "*", 4), (100, "-", 1), (0, "/", 5)]
    x, y = encode_problems(problems, TOK, answer_only=True)
    assert x.shape == y.shape and x.shape[1] == max(len(f"{a} {o} {b} = {right_answer(a, o, b)}\n")
                                                    for a, o, b in problems)
    for row, (a, op, b) in enumerate(problems):
        line = f"{a} {op} {b} = {right_answer(a, op, b)}\n"
        full = TOK.encode(line)
        n = len(full) - 1
        assert x[row, :n].tolist() == full[:-1] and (x[row, n:] == TOK.pad_id).all()
        labelled = (y[row] != -100).nonzero().flatten().tolist()
        # the labels are the tokens after '=': the space, the answer digits and the newline
        answer = f" {right_answer(a, op, b)}\n"
        first = len(f"{a} {op} {b} =")  # x[first] is '=' (x[0] is <bos>)
        assert TOK.itos[x[row, first]] == "="
        assert labelled == list(range(first, n))
        assert "".join(TOK.itos[t] for t in y[row, labelled].tolist()) == answer
        assert y[row, labelled].tolist() == full[first + 1:]  # y is x shifted by one
    xa, ya = encode_problems(problems, TOK, answer_only=False)
    assert torch.equal(xa, x)
    for row in range(len(problems)):
        n = int((x[row] != TOK.pad_id).sum())
        assert (ya[row, :n - 1] == x[row, 1:n]).all() and (ya[row, n:] == -100).all()


def test_padded_numbers_sit_at_fixed_widths_and_tools_pad_prompts_to_match():
    from bitnet.tasks import codec_for
    cfg = BitNetConfigArithmetic().with_overrides(["pad_numbers=true"])
    task, seen = problems_of(cfg, steps=range(5))
    assert {(a + b if op == "+" else right_answer(a, op, b)) == c for a, op, b, c in seen} == {True}
    x, y = task.get_batch(0, 64)
    lines = ["".join(TOK.itos[t] for t in row if t != TOK.pad_id)[5:] for row in x.tolist()]
    widths = {"+": (2, 2, 3), "-": (2, 2, 2), "*": (2, 2, 3), "/": (3, 2, 2)}
    for line, (a, op, b, c) in zip(lines, decode_batch(x, y)):
        wa, wb, wc = widths[op]
        assert line.startswith(f"{a:0{wa}d} {op} {b:0{wb}d} = ") and len(line.split()[-1]) == wc
    assert task.domain.max_length() == len("99 + 99 = 198\n")  # <bos> + the line, less the last target
    codec, plain = codec_for(task.identity()), codec_for(ArithmeticTask(BitNetConfigArithmetic()).identity())
    assert codec.to_model("7 + 12 =") == "07 + 12 =" and codec.to_model("144 / 12 =") == "144 / 12 ="
    assert codec.to_model("7 + 12 = 19") == "07 + 12 = 019" and codec.to_model("3 * 4 = 12") == "03 * 04 = 012"
    assert codec.to_model("Once upon a time") == "Once upon a time" and plain.to_model("7 + 1 =") == "7 + 1 ="
    # what a person reads: the numbers as written by hand, whatever the training format
    assert codec.display("07 + 12 = 019") == "7 + 12 = 19" and codec.display("00 * 05 = 000") == "0 * 5 = 0"
    assert codec.display("07 + 12 = 0x9") == "7 + 12 = 0x9" and plain.display("7 + 12 = 19") == "7 + 12 = 19"
    lines = task.sample_lines(Echo("019"), "cpu", torch.Generator().manual_seed(0), n_per_op=1)
    assert all(not re.search(r"\b0\d", ln) for ln in lines), lines  # no padded number is shown
    assert "number_format" not in ArithmeticTask(BitNetConfigArithmetic()).identity()  # plain runs: as before


def test_reversed_answers_are_written_backwards_and_read_forwards():
    from bitnet.arithmetic_codec import read_answer
    from bitnet.tasks import codec_for
    cfg = BitNetConfigArithmetic().with_overrides(["pad_numbers=true", "reverse_answers=true"])
    task = ArithmeticTask(cfg)
    x, y = task.get_batch(0, 64)
    for row in x.tolist():
        line = "".join(TOK.itos[t] for t in row if t != TOK.pad_id)[5:]
        prompt, written = line.split(" = ")
        a, op, b = prompt.split()
        assert written == task.domain.answer(int(a), op, int(b))[::-1]  # '07 + 12 = 910'
    assert task.domain.written_answer(7, "+", 12) == "910" and task.domain.answer(7, "+", 12) == "019"
    assert read_answer(" 910\n", True) == " 019\n" and read_answer(" 910", False) == " 910" and read_answer("", True) == ""
    codec = codec_for(task.identity())
    assert codec.display("07 + 12 =" + codec.decode(TOK.encode(" 910", bos=False))) == "7 + 12 = 19"
    assert codec.to_model("7 + 12 = 19") == "07 + 12 = 910" and codec.display("07 + 12 = 910") == "7 + 12 = 19"
    plain = codec_for(ArithmeticTask(BitNetConfigArithmetic()).identity())  # plain runs: as before
    assert plain.display("7 + 12 = 91") == "7 + 12 = 91" and plain.to_model("7 + 12 = 19") == "7 + 12 = 19"


def test_train_on_all_tokens_switch():
    x, y = ArithmeticTask(BitNetConfigArithmetic(train_on="all")).get_batch(0, 8)
    xa, ya = ArithmeticTask(BitNetConfigArithmetic(train_on="answer")).get_batch(0, 8)
    assert torch.equal(x, xa)
    assert (y != -100).sum() > 2 * (ya != -100).sum()
