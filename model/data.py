"""Training text: which files, split how, and cut into batches for truncated BPTT."""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".csv", ".html", ".xml", ".c", ".h"}
PAD_TARGET = -100  # cross_entropy's ignore_index: padded positions add nothing to the loss


def default_corpus_root() -> Path:
    """The running interpreter's standard library: text every machine with Python has."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(paths: list[str | Path] | None) -> tuple[list[Path], str]:
    """Files of the corpus in a fixed order, and a one-line description of it.

    With no paths: the standard library's own .py files. Some installs (pyenv) keep
    site-packages inside the stdlib folder; it is left out so the corpus does not depend on
    what happens to be installed."""
    if not paths:
        root = default_corpus_root()
        files = [
            p
            for p in sorted(root.rglob("*.py"))
            if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
        ]
        return files, f"python stdlib .py files under {root}"
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files += [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix in TEXT_SUFFIXES]
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus path not found: {p}")
    if not files:
        raise CorpusError(f"no text files found in {', '.join(map(str, paths))}")
    return files, "files: " + ", ".join(map(str, paths))


def is_validation(path: Path, fraction: float = 0.1) -> bool:
    """Deterministic split on the file's name and parent folder (not its absolute path, so
    the split is the same on every machine): a file is wholly train or wholly validation,
    and validation text is never trained on."""
    key = f"{path.parent.name}/{path.name}".encode()
    return zlib.crc32(key) % 1000 < fraction * 1000


class CorpusError(ValueError):
    """The corpus cannot be used as given (the message says why)."""


@dataclass
class Corpus:
    train: np.ndarray  # uint8 bytes, files concatenated in order
    val: np.ndarray
    description: str
    files: int


def load_corpus(paths: list[str | Path] | None, val_fraction: float = 0.1) -> Corpus:
    files, description = list_files(paths)
    if len(files) == 1:  # one file: the last val_fraction of it validates
        data = files[0].read_bytes()
        cut = int(len(data) * (1 - val_fraction))
        train, val = [data[:cut]], [data[cut:]]
    else:
        train = [f.read_bytes() for f in files if not is_validation(f, val_fraction)]
        val = [f.read_bytes() for f in files if is_validation(f, val_fraction)]
        if not val or not train:  # too few files for the rule: fall back to the tail
            data = b"".join(train + val)
            cut = int(len(data) * (1 - val_fraction))
            train, val = [data[:cut]], [data[cut:]]
    as_array = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8)
    return Corpus(as_array(train), as_array(val), description, len(files))


class StreamBatches:
    """Cuts a byte stream into B parallel rows and walks them in chunks of T steps.

    Row b reads its own contiguous shard of the stream, so the state a row ends one chunk
    with is the right state to start its next chunk with: that is what lets truncated BPTT
    learn to use state beyond T. Shards differ in length (the stream is cut at spread-out
    points), so the last chunks of short rows are padded: `lengths` says how many positions
    of each row are real, padded targets are PAD_TARGET, and the model freezes a row's state
    past its length."""

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int):
        if len(data) < batch_size * 2:
            raise CorpusError(f"{len(data)} bytes of text are too few for {batch_size} parallel "
                              f"rows (at least {2 * batch_size} needed)")
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        # Cut points spread evenly, nudged to a newline so rows start at line starts;
        # row b covers data[starts[b] : starts[b + 1]].
        n = len(data)
        starts = [0]
        for b in range(1, batch_size):
            at = n * b // batch_size
            nl = np.flatnonzero(data[at : at + 4096] == 10)
            starts.append(at + int(nl[0]) + 1 if len(nl) else at)
        starts.append(n)
        self.bounds = list(zip(starts[:-1], starts[1:], strict=True))
        longest = max(end - start for start, end in self.bounds)
        self.chunks_per_epoch = max(1, -(-(longest - 1) // seq_len))

    def get_batch(self, chunk: int):
        """Chunk k of every row: tokens (B, T), targets (B, T), lengths (B,)."""
        B, T = self.batch_size, self.seq_len
        x = np.zeros((B, T), dtype=np.int64)
        y = np.full((B, T), PAD_TARGET, dtype=np.int64)
        lengths = np.zeros(B, dtype=np.int64)
        for b, (start, end) in enumerate(self.bounds):
            lo = start + chunk * T
            n = max(0, min(T, end - 1 - lo))  # the last byte of a row is only a target
            x[b, :n] = self.data[lo : lo + n]
            y[b, :n] = self.data[lo + 1 : lo + 1 + n]
            lengths[b] = n
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(lengths)
