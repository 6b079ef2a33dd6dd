"""Character-level text corpora for language models: the bundled tiny Shakespeare or a file.

A corpus is its text encoded as integer ids of its characters (the vocabulary is the
sorted set of characters, as nanoGPT's shakespeare_char prepares it), split by characters
into the first 90% for training and the last 10% for validation. Batches are windows of
``block + 1`` characters: inputs the first ``block``, targets the same shifted by one.
"""

from __future__ import annotations

import bz2
import dataclasses
import os
from importlib import resources

import numpy as np

from ..errors import JitgradError

BUNDLED = "tinyshakespeare"
TRAIN_FRACTION = 0.9


@dataclasses.dataclass
class CharCorpus:
    """A text as character ids: ``train`` and ``val`` (int64), ``chars`` the vocabulary."""

    chars: str
    train: np.ndarray
    val: np.ndarray
    name: str

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """The ids of text's characters; JitgradError naming a character not in the
        vocabulary."""
        index = {c: i for i, c in enumerate(self.chars)}
        missing = sorted({c for c in text if c not in index})
        if missing:
            raise JitgradError(f"the text has characters outside the {self.name} vocabulary: "
                               f"{''.join(missing)!r}")
        return np.array([index[c] for c in text], np.int64)

    def decode(self, ids: np.ndarray) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))


def bundled_text() -> str:
    """The bundled tiny Shakespeare (see jitgrad/datasets/README.md)."""
    ref = resources.files("jitgrad") / "datasets" / f"{BUNDLED}.txt.bz2"
    with ref.open("rb") as f:
        return bz2.decompress(f.read()).decode("utf-8")


def corpus_from_text(text: str, name: str) -> CharCorpus:
    """The corpus of a text: its vocabulary and the 90/10 split by characters."""
    if len(text) < 20:
        raise JitgradError(f"{name}: a text of {len(text)} characters is too short to split "
                           f"into training and validation parts")
    chars = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(chars)}
    data = np.fromiter((lookup[c] for c in text), np.int64, len(text))
    cut = int(TRAIN_FRACTION * len(data))
    return CharCorpus(chars, data[:cut], data[cut:], name)


def load_text(path: str | os.PathLike[str] | None = None) -> CharCorpus:
    """The bundled tiny Shakespeare (path None) or a UTF-8 text file, as a CharCorpus."""
    if path is None:
        return corpus_from_text(bundled_text(), BUNDLED)
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise JitgradError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") \
                from None
    return corpus_from_text(text, os.path.basename(os.fspath(path)))


def windows(data: np.ndarray, starts: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) [len(starts), block]: the windows of data at starts, and the same
    shifted by one character."""
    offsets = np.asarray(starts, np.int64)[:, None] + np.arange(block)
    return data[offsets], data[offsets + 1]


def random_batch(data: np.ndarray, batch: int, block: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A batch of windows at uniformly random places (nanoGPT's get_batch)."""
    check_fits(data, block, "the text")
    return windows(data, rng.integers(0, len(data) - block, size=batch), block)


def check_fits(data: np.ndarray, block: int, what: str) -> None:
    if len(data) <= block:
        raise JitgradError(f"{what} has {len(data)} characters, too few for a block of "
                           f"{block} (a window needs block + 1)")
