"""Tests of parallel.data: determinism, dp-layout parity, resume, sources and their errors.

.venv/bin/pytest -q tests/unit/test_data.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallel.config import ConfigError, DataConfig
from parallel.data import (
    SEPARATOR,
    DataStream,
    WindowSource,
    build_source,
    decode,
    encode,
    sample_seed,
)

SEQ = 16


def synthetic(seed: int = 0, vocab: int = 256):
    return build_source(DataConfig(source="synthetic"), SEQ, seed, vocab)


def test_tokenizer_roundtrip():
    text = "héllo, wörld ✓"
    ids = encode(text)
    assert ids[:2] == [104, 0xC3] and all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert decode(ids) == text
    assert decode(torch.tensor(ids[:2])) == "h\ufffd"  # cut mid-character


def test_sample_seed_is_stable():
    assert sample_seed(0, 0) == sample_seed(0, 0)
    values = {sample_seed(s, i) for s in range(4) for i in range(64)}
    assert len(values) == 256 and all(0 <= v < 2**64 for v in values)


def test_synthetic_is_pure_function_of_seed_and_index():
    a, b = synthetic(), synthetic()
    forward = [a.sample(i) for i in range(5)]
    backward = [b.sample(i) for i in reversed(range(5))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert x.shape == (SEQ + 1,) and x.dtype == torch.long
        assert torch.equal(x, y)
    assert torch.equal(a.sample(3), forward[3])
    assert not torch.equal(forward[0], forward[1])
    assert not torch.equal(synthetic(seed=1).sample(0), forward[0])
    small = synthetic(vocab=7)
    ids = torch.cat([small.sample(i) for i in range(20)])
    assert ids.min() >= 0 and ids.max() == 6
    assert small.n_tokens is None and small.vocab_size == 7


def flatten(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.mark.parametrize("dp, micro", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_union_of_ranks_equals_dp1(dp, micro):
    source, global_batch = synthetic(), 8
    ref = DataStream(source, global_batch, 2, 0, 1)
    streams = [DataStream(source, global_batch, micro, r, dp) for r in range(dp)]
    for step in range(3):
        ref_batches = ref.next_step()
        assert len(ref_batches) == 4
        ref_x, ref_y = flatten(ref_batches)
        expect = torch.stack([source.sample(step * global_batch + i) for i in range(global_batch)])
        assert torch.equal(ref_x, expect[:, :-1]) and torch.equal(ref_y, expect[:, 1:])
        per_rank = [s.next_step() for s in streams]
        for batches in per_rank:
            assert len(batches) == global_batch // dp // micro
            assert all(x.shape == (micro, SEQ) and y.shape == (micro, SEQ) for x, y in batches)
        xs, ys = zip(*(flatten(b) for b in per_rank), strict=True)
        assert torch.equal(torch.cat(xs), ref_x) and torch.equal(torch.cat(ys), ref_y)
    assert all(s.position == 3 * global_batch for s in streams)


def test_labels_are_inputs_shifted():
    x, y = DataStream(synthetic(), 4, 4, 0, 1).next_step()[0]
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_resume_continues_identically():
    source = synthetic()
    full = DataStream(source, 8, 2, 1, 2)
    full.next_step()
    state = full.state_dict()
    assert state == {"position": 8}
    later = [full.next_step() for _ in range(2)]
    resumed = DataStream(source, 8, 2, 1, 2)
    resumed.load_state_dict(state)
    for expected in later:
        got = resumed.next_step()
        for (x, y), (ex, ey) in zip(got, expected, strict=True):
            assert torch.equal(x, ex) and torch.equal(y, ey)
    assert resumed.state_dict() == {"position": 24}


def test_stream_rejects_bad_layout():
    with pytest.raises(ConfigError, match="train.global_batch"):
        DataStream(synthetic(), 6, 2, 0, 2)
    with pytest.raises(ValueError, match="dp_rank"):
        DataStream(synthetic(), 8, 2, 2, 2)


def make_text_dir(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_bytes(b"second file " * 4)
    (root / "a.py").write_bytes(b"print('first file')\n" * 3)
    (root / "sub" / "c.md").write_bytes(b"# third\n" * 5)
    (root / "empty.txt").write_bytes(b"")
    (root / "blob.bin").write_bytes(b"\x00\xff" * 100)  # not a text suffix: skipped
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.py").write_bytes(b"skipped")
    return root


def test_text_directory(tmp_path):
    root = make_text_dir(tmp_path)
    source = build_source(DataConfig(source="text", path=str(root)), SEQ, 0, 512)
    expect = SEPARATOR.join([b"print('first file')\n" * 3, b"second file " * 4, b"# third\n" * 5])
    assert isinstance(source, WindowSource)
    assert source.tokens.tobytes() == expect
    assert source.n_tokens == len(expect) and source.vocab_size == 256
    offsets = set()
    for i in range(50):
        window = source.sample(i)
        start = source.offset(i)
        offsets.add(start)
        assert 0 <= start <= len(expect) - SEQ - 1
        assert bytes(window.tolist()) == expect[start : start + SEQ + 1]
    assert len(offsets) > 10
    again = build_source(DataConfig(source="text", path=str(root)), SEQ, 0, 512)
    assert torch.equal(again.sample(7), source.sample(7))
    reseeded = build_source(DataConfig(source="text", path=str(root)), SEQ, 1, 512)
    assert not torch.equal(reseeded.sample(7), again.sample(7))


def test_text_directory_reads_a_symlinked_file_only_when_it_stays_inside(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("inside a\n")
    (tmp_path / "secret.txt").write_text("SECRET\n")
    (root / "b.txt").symlink_to(root / "a.txt")  # inside: read
    (root / "c.txt").symlink_to(tmp_path / "secret.txt")  # outside: skipped
    source = build_source(DataConfig(source="text", path=str(root)), 4, 0, 512)
    assert source.tokens.tobytes() == SEPARATOR.join([b"inside a\n", b"inside a\n"])


def test_text_max_bytes_and_offset_range(tmp_path):
    root = make_text_dir(tmp_path)
    capped = build_source(DataConfig(source="text", path=str(root), max_bytes=70), SEQ, 0, 256)
    assert capped.tokens.tobytes() == b"print('first file')\n" * 3 + SEPARATOR + b"second file "[:8]
    file = tmp_path / "data.weird"  # a single file is read whatever its suffix
    file.write_bytes(bytes(range(SEQ + 3)))
    source = build_source(DataConfig(source="text", path=str(file)), SEQ, 0, 256)
    assert source.n_tokens == SEQ + 3
    starts = {int(source.sample(i)[0]) for i in range(200)}
    assert starts == {0, 1, 2}  # uniform over [0, n_tokens - seq_len - 1], both ends reachable


def test_stdlib_source():
    source = build_source(DataConfig(source="text", path="stdlib", max_bytes=200_000), 64, 0, 256)
    assert 64 < source.n_tokens <= 200_000
    ids = torch.stack([source.sample(i) for i in range(8)])
    assert ids.shape == (8, 65) and ids.min() >= 0 and ids.max() < 256
    assert "def " in decode(source.tokens[:100_000].tolist())


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_tokens_file(tmp_path, dtype):
    vocab = 70_000 if dtype == "uint32" else 1000
    data = (np.arange(5000) * 17 % vocab).astype(dtype)
    if dtype == "uint32":
        data[-1] = 69_999
    file = tmp_path / "train.bin"
    data.tofile(file)
    source = build_source(DataConfig(source="tokens", path=str(file), token_dtype=dtype), SEQ, 3, vocab)
    assert source.n_tokens == 5000 and source.vocab_size == vocab
    for i in range(20):
        start = source.offset(i)
        assert 0 <= start <= 5000 - SEQ - 1
        window = source.sample(i)
        assert window.dtype == torch.long
        assert window.tolist() == data[start : start + SEQ + 1].astype(np.int64).tolist()
    other = build_source(DataConfig(source="tokens", path=str(file), token_dtype=dtype), SEQ, 3, vocab)
    assert torch.equal(other.sample(11), source.sample(11))


def config_error(data: DataConfig, seq_len: int = SEQ, vocab: int = 256) -> str:
    with pytest.raises(ConfigError) as info:
        build_source(data, seq_len, 0, vocab)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors_name_data_path(tmp_path):
    missing = str(tmp_path / "nope")
    for source in ("text", "tokens"):
        msg = config_error(DataConfig(source=source, path=missing))
        assert msg.startswith(f"data.path={missing!r}") and "no such" in msg
    assert "data.path is required" in config_error(DataConfig(source="text"))

    empty_file = tmp_path / "empty.txt"
    empty_file.write_bytes(b"")
    assert "empty" in config_error(DataConfig(source="text", path=str(empty_file)))
    assert "empty" in config_error(DataConfig(source="tokens", path=str(empty_file)))

    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    msg = config_error(DataConfig(source="text", path=str(empty_dir)))
    assert "data.path" in msg and "no readable" in msg
    (empty_dir / "blob.bin").write_bytes(b"binary")
    assert "no readable" in config_error(DataConfig(source="text", path=str(empty_dir)))

    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * SEQ)  # needs SEQ + 1
    msg = config_error(DataConfig(source="text", path=str(short)))
    assert "data.path" in msg and f"{SEQ} tokens" in msg

    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    assert "multiple of 2" in config_error(DataConfig(source="tokens", path=str(odd)))

    big = tmp_path / "big.bin"
    np.full(100, 300, dtype=np.uint16).tofile(big)
    msg = config_error(DataConfig(source="tokens", path=str(big)))
    assert "data.path" in msg and "model.vocab_size=256" in msg and "300" in msg


def test_text_needs_byte_vocab(tmp_path):
    file = tmp_path / "a.txt"
    file.write_bytes(b"y" * 100)
    assert "model.vocab_size=128" in config_error(DataConfig(source="text", path=str(file)), vocab=128)


def test_tokens_checked_per_sample_beyond_prefix(tmp_path, monkeypatch):
    import parallel.data as data_mod

    monkeypatch.setattr(data_mod, "VOCAB_CHECK_TOKENS", 10)
    file = tmp_path / "t.bin"
    tokens = np.zeros(40, dtype=np.uint16)
    tokens[20:] = 999
    tokens.tofile(file)
    source = build_source(DataConfig(source="tokens", path=str(file)), SEQ, 0, 256)  # prefix passes
    with pytest.raises(ConfigError, match="data.path.*model.vocab_size=256"):
        for i in range(50):
            source.sample(i)
