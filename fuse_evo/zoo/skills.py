"""The zoo's skills: tiny text-to-text problems a small transformer learns in minutes on a CPU.

Each skill writes examples as ``"<name> <input> ="`` followed by the answer; the lm-eval tasks
feed the prompt as context and ``" " + answer`` as the continuation, so training and scoring see
the very same characters. All generation is driven by an explicit ``random.Random`` so the same
seed always gives the same data.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase
DIGITS = string.digits


@dataclass(frozen=True)
class Example:
    prompt: str  # what lm-eval passes as context, e.g. "inc 4821 ="
    answer: str  # the continuation after the one-space target delimiter, e.g. "4822"

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def _word(rng: random.Random, alphabet: str, min_len: int, max_len: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))


def increment(rng: random.Random) -> Example:
    """Add one to a 3-5 digit number (carries make it more than a lookup)."""
    digits = rng.randint(3, 5)
    n = rng.randrange(10 ** (digits - 1), 10**digits)
    return Example(f"inc {n} =", str(n + 1))


def reverse(rng: random.Random) -> Example:
    """Write a 3-6 letter string backwards."""
    w = _word(rng, LETTERS, 3, 6)
    return Example(f"rev {w} =", w[::-1])


SHIFT = 3


def shift(rng: random.Random) -> Example:
    """Caesar cipher: move every letter of a 3-6 letter string SHIFT places on (z wraps to a)."""
    w = _word(rng, LETTERS, 3, 6)
    out = "".join(LETTERS[(LETTERS.index(c) + SHIFT) % 26] for c in w)
    return Example(f"rot {w} =", out)


SKILLS: dict[str, Callable[[random.Random], Example]] = {
    "increment": increment,
    "reverse": reverse,
    "shift": shift,
}


# ---------------------------------------------------------------------------- near misses
# Multiple-choice tasks offer the answer among near misses a model could plausibly produce,
# so choosing among them tests the skill, not the answer's format: the input copied, and the
# answer with the kind of slip each skill invites.
N_CHOICES = 4


def _increment_misses(ex: Example) -> list[str]:
    n = int(ex.prompt.split()[1])
    return [str(n), str(n + 2), str(n + 11)]  # copied, one too far, a slip in the tens


def _reverse_misses(ex: Example) -> list[str]:
    w, r = ex.prompt.split()[1], ex.answer
    return [w, r[1] + r[0] + r[2:], r[1:] + r[0]]  # copied, first pair swapped, rotated


def _shift_misses(ex: Example) -> list[str]:
    w = ex.prompt.split()[1]
    return [w] + ["".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in w) for k in (SHIFT - 1, SHIFT + 1)]


NEAR_MISSES: dict[str, Callable[[Example], list[str]]] = {
    "increment": _increment_misses,
    "reverse": _reverse_misses,
    "shift": _shift_misses,
}


def _bump(ch: str) -> str:
    alphabet = DIGITS if ch in DIGITS else LETTERS
    return alphabet[(alphabet.index(ch) + 1) % len(alphabet)]


def choices(skill: str, ex: Example, index: int) -> tuple[list[str], int]:
    """``N_CHOICES`` distinct choices for an example and the position of its answer.

    Near misses that coincide with the answer or with each other (a palindrome reversed, a
    repeated letter) are replaced by the answer with one more character moved on. The answer's
    position cycles with the example's index, so every position holds the gold equally often.
    """
    wrong: list[str] = []
    for miss in NEAR_MISSES[skill](ex):
        if miss != ex.answer and miss not in wrong:
            wrong.append(miss)
    i = 0
    while len(wrong) < N_CHOICES - 1:
        pos, ch = i % len(ex.answer), ex.answer[i % len(ex.answer)]
        for _ in range(1 + i // len(ex.answer)):
            ch = _bump(ch)
        miss = ex.answer[:pos] + ch + ex.answer[pos + 1 :]
        if miss != ex.answer and miss not in wrong:
            wrong.append(miss)
        i += 1
    gold = index % N_CHOICES
    return wrong[:gold] + [ex.answer] + wrong[gold:], gold


class GenericText:
    """The alphabet's generic data: sentences over a fixed random lexicon of pseudo-words.

    It has structure a model can learn (which words exist, how long sentences are), so
    pretraining on it is language modelling, not noise; it carries none of the skills.
    """

    def __init__(self, seed: int, lexicon_size: int = 200):
        rng = random.Random(f"lexicon-{seed}")
        self.lexicon = [_word(rng, LETTERS + DIGITS, 2, 6) for _ in range(lexicon_size)]

    def __call__(self, rng: random.Random) -> str:
        return " ".join(rng.choice(self.lexicon) for _ in range(rng.randint(3, 6)))


def eval_splits(
    skill: str, seed: int, n_search: int, n_heldout: int
) -> tuple[list[Example], list[Example]]:
    """Disjoint search and held-out example lists (unique prompts) for one skill."""
    rng = random.Random(f"eval-{skill}-{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    make = SKILLS[skill]
    tries = 0
    while len(out) < n_search + n_heldout:
        tries += 1
        if tries > 100 * (n_search + n_heldout):
            raise ValueError(f"skill {skill!r} cannot yield {n_search + n_heldout} unique prompts")
        ex = make(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out[:n_search], out[n_search:]
