"""What a word is, for the text tasks (the known words of their training text) and the
detectors (gibberish in generated samples): both must count words the same way."""
import re

WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words_of(text: str) -> list[str]:
    """Lower-case words (letters and inner apostrophes); numbers and punctuation are dropped."""
    return WORD_RE.findall(text.lower())
