"""Arithmetic problems as text: the 32-token character tokenizer, the line format
(`12 + 7 = 19`), and the codec that turns a run's training format (padded numbers, answers
written backwards) into what a person writes and back. No imports from this package."""
import re
from dataclasses import dataclass

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


def format_prompt(a: int, op: str, b: int, width_a: int = 0, width_b: int = 0) -> str:
    """'12 + 7 =', or with widths (pad_numbers) '12 + 07 ='."""
    return f"{a:0{width_a}d} {op} {b:0{width_b}d} ="


LINE_RE = re.compile(r"^(\s*)(\d+)\s*([-+*/])\s*(\d+)\s*=(\s*)(-?\d+)?(.*)$", re.S)  # prompt, answer, rest


def read_answer(completion: str, reversed_answers: bool) -> str:
    """A completion as a person reads it: a run trained with reverse_answers writes '019' as
    ' 910', so its digits are put back in order; the spacing around them is kept."""
    if not reversed_answers:
        return completion
    core = completion.strip()
    start = completion.index(core) if core else 0
    return completion[:start] + core[::-1] + completion[start + len(core):]


@dataclass
class ArithmeticCodec:
    """Problems in two forms: the model's, as the run trained (pad_numbers: '07 + 12 = 019';
    reverse_answers: answer digits last first, '910') and a person's ('7 + 12 = 19')."""
    number_format: dict  # {op: [width of a, of b, of the answer]}; empty = no padding
    reverse_answers: bool = False
    kind = "problems"  # evaluate --arithmetic
    max_new_tokens = 8
    tokenizer = None  # no free text to score

    def __post_init__(self):
        self.tok = CharTokenizer()
        self.stop_id = self.tok.newline_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids) -> str:
        return self.tok.decode(ids)

    def to_model(self, text: str) -> str:
        """'7 + 12 =' -> '07 + 12 =', '7 + 12 = 19' -> '07 + 12 = 910' (as the run trained); text
        that is not a problem comes back unchanged."""
        m = LINE_RE.match(text)
        if not m:
            return text
        wa, wb, wc = self.number_format.get(m[3], (0, 0, 0))
        answer = m[6] or ""
        if answer:
            answer = f"{int(answer):0{wc}d}"
            answer = answer[::-1] if self.reverse_answers else answer
        return m[1] + format_prompt(int(m[2]), m[3], int(m[4]), wa, wb) + m[5] + answer + m[7]

    def display(self, text: str) -> str:
        """'07 + 12 = 910' -> '7 + 12 = 19': numbers without padding, the answer in the usual
        order; an answer that is not a number keeps its characters (put back in order)."""
        m = LINE_RE.match(text)
        if not m:
            return text
        answer = read_answer(m[5] + (m[6] or "") + m[7], self.reverse_answers).strip()
        if re.fullmatch(r"-?\d+", answer):
            answer = str(int(answer))
        return f"{m[1]}{format_prompt(int(m[2]), m[3], int(m[4]))}{' ' if answer else ''}{answer}"

    def save_pretrained(self, out_dir: str) -> dict:
        arithmetic_tokenizer().save_pretrained(out_dir)
        return {"bos": self.tok.bos_id, "stop": self.stop_id, "pad": self.tok.pad_id,
                "max_new_tokens": self.max_new_tokens}


def arithmetic_tokenizer():
    """CharTokenizer as a transformers PreTrainedTokenizerFast with the same ids: one token per
    character, <bos> prepended, specials (and the unused <rN>) skipped on decode."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = CharTokenizer()
    tok = Tokenizer(models.WordLevel(vocab=dict(chars.stoi), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tok.decoder = decoders.Fuse()  # join the pieces without spaces
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", chars.bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": [t for t in chars.itos if t not in CHARS
                                                           and t not in ("<pad>", "<bos>", "<eos>", "<unk>")]})
    return fast
