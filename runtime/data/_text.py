"""A synthetic English-like text corpus for the byte-level language model, and its reader.

A tiny grammar (a few hundred words, Zipf-weighted, with subject-verb agreement, a/an,
tense kept within a paragraph, capitals, commas, quotes, questions and blank lines between
paragraphs) gives a character model real structure to learn: its loss drops well below the
uniform ``ln 256`` within a few dozen steps.

The text is written in chunks of paragraphs, chunk ``i`` from its own stream seeded with
``(seed, i)``, so memory stays bounded for any size and the file is a pure function of
``(n_bytes, seed)``; a shorter corpus is a prefix of a longer one with the same seed. Only
``random.Random.random()`` is used, whose sequence for a given seed Python guarantees
across versions.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.errors import ConfigError, DataError, DatasetNotFoundError

_PARAGRAPHS_PER_CHUNK = 200


def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(sep))


NAMES = _words(
    "Alice Bob Clara David Emma Felix Grace Henry Iris Jack Kate Leo Maya Noah Olive Paul Quinn Rosa "
    "Sam Tara Uma Victor Wendy Yara Zane Mira Omar Lena Hugo Nina"
)
NOUNS = _words(
    "farmer teacher child baker doctor sailor king queen dog cat horse bird fox wolf bear rabbit "
    "river mountain forest village city garden house window door road bridge market field lake "
    "boat ship train letter book story song poem map key box basket cup bottle lamp candle clock "
    "table chair bed coat hat shoe apple bread cake cheese egg fish flower tree stone star moon "
    "cloud storm wind fire lantern painter student soldier merchant musician neighbor friend "
    "stranger machine engine wheel ladder rope coin ring"
)
ADJECTIVES = _words(
    "old young small large quiet loud bright dark warm cold heavy light happy sad clever brave "
    "tired hungry gentle strange ancient empty full green red blue golden silver wooden broken "
    "new careful busy lazy proud kind wild calm sharp soft narrow wide tall short rich poor "
    "clean dirty lonely curious honest"
)
VERBS_T = _words(
    "carry open close find paint build watch follow help visit clean fix push pull lift "
    "call answer count cover deliver explore guard hide join kick land mark miss move "
    "order pack plant protect reach repair save share start touch trust wash"
)
VERBS_I = _words("walk rest wait laugh listen jump dance travel work return shout whisper smile climb arrive")
ADVERBS = _words(
    "slowly quickly quietly loudly carefully happily sadly gently bravely suddenly often rarely "
    "always never again together alone early late softly eagerly calmly patiently proudly kindly"
)
PREPOSITIONS = _words("to from near behind under over across along beside toward into around past through above")
TIMES = _words(
    "in the morning|at night|after the rain|before dinner|every day|last week|on Monday|in the spring|"
    "at noon|during the storm|in winter|after school|at dawn|one evening|long ago",
    sep="|",
)
CONNECTIVES = ("and", "but", "so", "while", "because")
SAY = ("said", "asked", "replied", "shouted", "whispered")


def _zipf(n: int, exponent: float = 0.9) -> list[float]:
    total, cum = 0.0, []
    for i in range(n):
        total += 1.0 / (i + 1) ** exponent
        cum.append(total)
    return cum


_CUM = {id(words): _zipf(len(words)) for words in (NAMES, NOUNS, ADJECTIVES, VERBS_T, VERBS_I, ADVERBS)}


class _Grammar:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def p(self, prob: float) -> bool:
        return self.rng.random() < prob

    def pick(self, words: Sequence[str]) -> str:
        cum = _CUM.get(id(words))
        if cum is None:
            return words[int(self.rng.random() * len(words))]
        x = self.rng.random() * cum[-1]
        lo, hi = 0, len(cum) - 1
        while lo < hi:  # bisect by hand: only random() touches the stream
            mid = (lo + hi) // 2
            if cum[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        return words[lo]

    @staticmethod
    def plural(noun: str) -> str:
        if noun in _IRREGULAR_PLURAL:
            return _IRREGULAR_PLURAL[noun]
        return _add_s(noun)

    @staticmethod
    def inflect(verb: str, singular: bool, past: bool) -> str:
        if past:
            if verb in _IRREGULAR_PAST:
                return _IRREGULAR_PAST[verb]
            if verb.endswith("e"):
                return verb + "d"
            if verb.endswith("y") and verb[-2] not in "aeiou":
                return verb[:-1] + "ied"
            return verb + "ed"
        return _add_s(verb) if singular else verb

    def noun_phrase(self, subject: bool) -> tuple[str, bool]:
        """(phrase, singular)."""
        if subject and self.p(0.3):
            return self.pick(NAMES), True
        singular = self.p(0.65)
        noun = self.pick(NOUNS)
        words = [self.pick(ADJECTIVES)] if self.p(0.45) else []
        words.append(noun if singular else self.plural(noun))
        if singular:
            det = self.pick(("the", "the", "a", "this", "that", "my", "her", "his", "every"))
            if det == "a" and words[0][0] in "aeiou":
                det = "an"
        else:
            det = self.pick(("the", "the", "some", "these", "those", "our", "many"))
        return " ".join([det, *words]), singular

    def clause(self, past: bool) -> str:
        subj, singular = self.noun_phrase(subject=True)
        if self.p(0.6):
            obj, _ = self.noun_phrase(subject=False)
            parts = [subj, self.inflect(self.pick(VERBS_T), singular, past), obj]
        else:
            parts = [subj, self.inflect(self.pick(VERBS_I), singular, past)]
            if self.p(0.5):
                parts.append(self.pick(ADVERBS))
        if self.p(0.4):
            place, _ = self.noun_phrase(subject=False)
            parts += [self.pick(PREPOSITIONS), place]
        return " ".join(parts)

    def sentence(self, past: bool) -> str:
        kind = self.rng.random()
        if kind < 0.12:  # a question
            subj, singular = self.noun_phrase(subject=True)
            aux = "did" if past else ("does" if singular else "do")
            obj, _ = self.noun_phrase(subject=False)
            return f"{aux.capitalize()} {subj} {self.pick(VERBS_T)} {obj}?"
        if kind < 0.24:  # speech
            said = self.pick(SAY)
            return f'"{_cap(self.clause(past))}," {said} {self.pick(NAMES)}.'
        text = self.clause(past)
        if kind < 0.40:
            text = f"{self.pick(TIMES)}, {text}"
        elif kind < 0.55:
            text = f"{text}, {self.pick(CONNECTIVES)} {self.clause(past)}"
        return _cap(text) + ("!" if self.p(0.04) else ".")

    def paragraph(self) -> str:
        past = self.p(0.5)
        n = 3 + int(self.rng.random() * 5)
        return " ".join(self.sentence(past) for _ in range(n))


_IRREGULAR_PLURAL = {"child": "children", "wolf": "wolves", "shelf": "shelves", "fish": "fish"}
_IRREGULAR_PAST = {"find": "found", "build": "built", "hide": "hid"}


def _add_s(word: str) -> str:
    """Plural of a regular noun, or third-person singular of a verb."""
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _chunk(seed: int, index: int) -> bytes:
    g = _Grammar(random.Random(f"skewless-text:{seed}:{index}"))
    return "".join(g.paragraph() + "\n\n" for _ in range(_PARAGRAPHS_PER_CHUNK)).encode("utf-8")


def generate_text(path: str | os.PathLike[str], n_bytes: int, seed: int = 0) -> Path:
    """Write exactly ``n_bytes`` of synthetic ASCII (so UTF-8) text to ``path``; returns it.

    Written to a temporary file beside ``path`` and renamed into place, so a reader never
    sees a half-written corpus.
    """
    if n_bytes < 1:
        raise ConfigError(f"n_bytes ({n_bytes}) must be >= 1")
    if seed < 0:
        raise ConfigError(f"seed ({seed}) must be >= 0")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    written, index = 0, 0
    try:
        with open(tmp, "wb") as f:
            while written < n_bytes:
                data = _chunk(seed, index)[: n_bytes - written]
                f.write(data)
                written += len(data)
                index += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def load_text_tokens(path: str | os.PathLike[str]) -> np.ndarray:
    """The file's bytes as a ``uint8`` array: the byte-level model's token ids."""
    p = Path(path)
    if not p.is_file():
        raise DatasetNotFoundError(
            f"text corpus {str(p)!r} does not exist; point data.path at a text file or set data.generate: true"
        )
    tokens = np.fromfile(p, dtype=np.uint8)
    if tokens.size == 0:
        raise DataError(f"text corpus {str(p)!r} is empty")
    return tokens
