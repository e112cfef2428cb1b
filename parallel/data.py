"""Token sources and a deterministic, resumable data-parallel batch stream.

Three sources, all addressed by a global sample index so that every layout
(dp size, micro-batch size) sees exactly the same samples in the same order:

- synthetic: random tokens; sample i is a pure function of (seed, i).
- text: byte-level tokens (token = byte value, vocab 256) of a file or of the
  text files under a directory; `stdlib` means this Python's standard library.
- tokens: a flat uint16/uint32 token file (nanoGPT style), memory-mapped.

Sample i of text/tokens is the window of seq_len+1 tokens starting at an offset
that is a pure function of (seed, i). Try it:

    python -c "from parallel.config import DataConfig; from parallel.data import *; \
s = build_source(DataConfig(source='text', path='stdlib', max_bytes=2**20), 64, 0, 256); \
print(s.n_tokens, repr(decode(s.sample(0).tolist())))"
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from parallel.config import ConfigError, DataConfig

VOCAB_SIZE = 256  # byte-level tokenizer
SEPARATOR = b"\n\n"  # between files of a text corpus
_TEXT_EXTS = "py pyi txt md rst c h cc cpp hpp rs go java js ts html css json toml yaml yml cfg ini sh tex csv xml"
TEXT_SUFFIXES = frozenset("." + ext for ext in _TEXT_EXTS.split())
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "node_modules"})
STDLIB_SKIP_DIRS = SKIP_DIRS | {"test", "tests", "idle_test", "lib2to3"}
VOCAB_CHECK_TOKENS = 1 << 20  # `tokens` files: max id is checked on this prefix at build, then per sample

_MASK64 = (1 << 64) - 1


def encode(text: str) -> list[int]:
    """UTF-8 bytes of `text` as token ids in [0, 256)."""
    return list(text.encode("utf-8"))


def decode(ids: Iterable[int]) -> str:
    """Inverse of `encode`; invalid UTF-8 (e.g. a window cut mid-character) becomes U+FFFD."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int) -> int:
    """A stable 64-bit hash of (seed, index): the only randomness behind sample `index`."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64))


class TokenSource:
    """Sample i -> (seq_len+1,) long tensor, a pure function of (seed, i)."""

    vocab_size: int  # of the data (256 for text)
    n_tokens: int | None  # corpus length; None for synthetic
    seq_len: int
    seed: int

    def sample(self, index: int) -> torch.Tensor:  # (seq_len+1,) int64
        raise NotImplementedError


class SyntheticSource(TokenSource):
    def __init__(self, seq_len: int, seed: int, vocab_size: int) -> None:
        self.seq_len, self.seed, self.vocab_size, self.n_tokens = seq_len, seed, vocab_size, None

    def sample(self, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, index))
        return torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=gen)  # (T+1,)


class WindowSource(TokenSource):
    """Windows of a flat token array (uint8 bytes of text, or a uint16/uint32 memmap)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, vocab_size: int, path: str) -> None:
        self.tokens, self.seq_len, self.seed, self.vocab_size, self.path = tokens, seq_len, seed, vocab_size, path
        self.n_tokens = int(tokens.shape[0])
        if self.n_tokens < seq_len + 1:
            raise ConfigError(
                f"data.path={path!r}: corpus has {self.n_tokens} tokens, fewer than train.seq_len+1 = {seq_len + 1}"
            )
        self._n_offsets = self.n_tokens - seq_len  # offsets 0 .. n_tokens - seq_len - 1

    def offset(self, index: int) -> int:
        """Start of sample `index`; uniform up to a bias below n_offsets / 2**64."""
        return sample_seed(self.seed, index) % self._n_offsets

    def sample(self, index: int) -> torch.Tensor:
        start = self.offset(index)
        window = np.asarray(self.tokens[start : start + self.seq_len + 1]).astype(np.int64)  # (T+1,)
        if self.tokens.dtype != np.uint8 and int(window.max()) >= self.vocab_size:
            raise ConfigError(
                f"data.path={self.path!r}: token id {int(window.max())} near offset {start} is not below "
                f"model.vocab_size={self.vocab_size}"
            )
        return torch.from_numpy(window)


def _walk_text_files(root: Path, skip: frozenset[str], top: str | None) -> Iterator[Path]:
    """Text files under `root` in sorted(Path) order, lazily; symlinked directories are not followed,
    and with `top` a symlinked file is read only when it points inside that directory."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in skip and not entry.name.startswith("."):
                yield from _walk_text_files(Path(entry.path), skip, top)
        elif entry.is_file() and Path(entry.name).suffix.lower() in TEXT_SUFFIXES:
            if top and entry.is_symlink() and not os.path.realpath(entry.path).startswith(top.rstrip(os.sep) + os.sep):
                continue
            yield Path(entry.path)


def read_text_corpus(path: str, max_bytes: int) -> np.ndarray:
    """Bytes of a file, or of the text files under a directory joined by SEPARATOR, at most max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"]) if path == "stdlib" else Path(path)
    if not root.exists():
        raise ConfigError(f"data.path={path!r}: no such file or directory")
    if root.is_dir():
        # The standard library is this Python's own (Debian links sitecustomize.py out of it); any other
        # directory may hold a link planted to read what its owner cannot: only links inside it count.
        stdlib = path == "stdlib"
        top = None if stdlib else os.path.realpath(root)
        files: Iterable[Path] = _walk_text_files(root, STDLIB_SKIP_DIRS if stdlib else SKIP_DIRS, top)
    else:
        files = [root]
    chunks: list[bytes] = []
    total = 0
    for file in files:
        sep = SEPARATOR if chunks else b""
        room = max_bytes - total - len(sep)
        if room <= 0:
            break
        try:
            with open(file, "rb") as f:
                data = f.read(room)
        except OSError:
            continue
        if data:
            chunks += [sep, data]
            total += len(sep) + len(data)
    if not chunks:
        what = "directory has no readable, non-empty text files" if root.is_dir() else "file is empty or unreadable"
        raise ConfigError(f"data.path={path!r}: {what}")
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def read_token_file(path: str, dtype: str, vocab_size: int) -> np.ndarray:
    """Memory-map a flat token file; the max id is checked on the first VOCAB_CHECK_TOKENS only."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"data.path={path!r}: no such file")
    if not file.is_file():
        raise ConfigError(f"data.path={path!r}: not a file (data.source=tokens needs a flat token file)")
    size, itemsize = file.stat().st_size, np.dtype(dtype).itemsize
    if size == 0:
        raise ConfigError(f"data.path={path!r}: file is empty")
    if size % itemsize:
        raise ConfigError(f"data.path={path!r}: size {size} is not a multiple of {itemsize} (data.token_dtype={dtype})")
    tokens = np.memmap(file, dtype=dtype, mode="r")
    top = int(tokens[:VOCAB_CHECK_TOKENS].max())
    if top >= vocab_size:
        raise ConfigError(f"data.path={path!r}: token id {top} is not below model.vocab_size={vocab_size}")
    return tokens


def build_source(data: DataConfig, seq_len: int, seed: int, vocab_size: int) -> TokenSource:
    """The TokenSource a DataConfig describes; every problem is a one-line ConfigError."""
    if data.source == "synthetic":
        return SyntheticSource(seq_len, seed, vocab_size)
    if not data.path:
        raise ConfigError(f"data.path is required for data.source={data.source}")
    if data.source == "text":
        if vocab_size < VOCAB_SIZE:
            raise ConfigError(
                f"model.vocab_size={vocab_size} is below {VOCAB_SIZE}, the byte vocabulary of data.source=text"
            )
        corpus = read_text_corpus(data.path, data.max_bytes)
        return WindowSource(corpus, seq_len, seed, VOCAB_SIZE, data.path)
    tokens = read_token_file(data.path, data.token_dtype, vocab_size)
    return WindowSource(tokens, seq_len, seed, vocab_size, data.path)


class DataStream:
    """This dp rank's micro-batches, step by step; the position is a global sample index.

    Step k covers samples [position, position + global_batch); rank r takes the contiguous
    slice of per_rank = global_batch // dp_size samples at position + r * per_rank, split in
    order into micro-batches. The union over ranks is the same for any dp_size.
    """

    def __init__(self, source: TokenSource, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if global_batch % (dp_size * micro_batch):
            raise ConfigError(
                f"train.global_batch={global_batch} is not divisible by dp*micro_batch = {dp_size}*{micro_batch}"
            )
        self.source, self.global_batch, self.micro_batch = source, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.position = 0

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(inputs, labels)] per micro-batch, each (micro_batch, seq_len) int64; advances position."""
        first = self.position + self.dp_rank * self.per_rank
        batches = []
        for start in range(first, first + self.per_rank, self.micro_batch):
            windows = torch.stack([self.source.sample(i) for i in range(start, start + self.micro_batch)])  # (B, T+1)
            batches.append((windows[:, :-1].contiguous(), windows[:, 1:].contiguous()))  # (B, T), (B, T)
        self.position += self.global_batch
        return batches

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"data stream position must be >= 0, got {position}")
        self.position = position
