"""Token-file sources: round trips per format, the delimiter scan, provenance, cache, errors."""

import gzip
import os
import pickle
import struct
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cp_data.datasets import open_token_files
from cp_data.sources import scan, scan_offsets, sniff_format, write_llmc, write_megatron, write_numpy
from hypothesis_profiles import few_examples

EOS, BOS = 0, 1


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CP_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "cp_data_cache"))


def bodies(max_id):
    """Documents without delimiters: ids in [2, max_id]; empty ones and long ones included."""
    return st.lists(st.lists(st.integers(2, max_id), max_size=40), max_size=12)


def as_lists(source):
    return [source[i].tolist() for i in range(len(source))]


def layout(fmt, docs, dtype, d):
    """Write ``docs`` in ``fmt``; return (path, open kwargs, the documents expected back)."""
    if fmt == "numpy eos":  # each document ends with its EOS; a tail without EOS is a document too
        expected = [b + [EOS] for b in docs[:-1]] + ([docs[-1]] if docs and docs[-1] else [])
        return write_numpy(d / "x.npy", expected, dtype), dict(dtype=dtype, eos_token_id=EOS), expected
    if fmt == "numpy bos":
        expected = [[BOS] + b for b in docs]
        return write_numpy(d / "x.npy", expected, dtype), dict(dtype=dtype, bos_token_id=BOS), expected
    if fmt == "numpy bos+eos":
        expected = [[BOS] + b + [EOS] for b in docs]
        kwargs = dict(dtype=dtype, eos_token_id=EOS, bos_token_id=BOS)
        return write_numpy(d / "x.npy", expected, dtype), kwargs, expected
    if fmt == "numpy sidecar":  # empty documents survive; the EOS given is never scanned for
        body = [[EOS] + b for b in docs]
        return write_numpy(d / "x.npy", docs + body, dtype, sidecar=True), dict(dtype=dtype, eos_token_id=EOS), docs + body
    if fmt == "nanogpt":
        expected = [b + [EOS] for b in docs]
        return write_numpy(d / "x.bin", expected, "uint16"), dict(eos_token_id=EOS), expected
    if fmt == "megatron":  # documents of 0..n sequences; some sequences empty
        rng = np.random.default_rng(len(docs))
        cuts = np.sort(rng.integers(0, 2 * len(docs) + 1, size=len(docs) + 1))
        cuts[0], cuts[-1] = 0, 2 * len(docs)
        sequences = [s for b in docs for s in (b[: len(b) // 2], b[len(b) // 2 :])]
        expected = [sum(sequences[a:b], []) for a, b in zip(cuts[:-1], cuts[1:])]
        modes = [0] * len(sequences) if len(docs) % 2 else None
        kind = {"uint16": "uint16", "uint32": "int32"}[dtype]  # Megatron has no uint32 code
        write_megatron(d / "x", sequences, kind, document_indices=cuts, sequence_modes=modes)
        return d / "x.idx", {}, expected
    if fmt == "llmc":  # BOS-delimited by llm.c's own delimiter
        model, bos = ("gpt-2", 50256) if dtype == "uint16" else ("llama-3", 128000)
        expected = [[bos] + b for b in docs]
        return write_llmc(d / "x.bin", expected, model), {}, expected
    raise AssertionError(fmt)


FORMATS = ["numpy eos", "numpy bos", "numpy bos+eos", "numpy sidecar", "nanogpt", "megatron", "llmc"]


@few_examples
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
@given(data=st.data())
def test_round_trip_every_document(fmt, dtype, data):
    max_id = 2**16 - 1 if dtype == "uint16" else 2**31 - 1 if fmt == "megatron" else 2**32 - 1
    docs = data.draw(bodies(max_id))
    if fmt in ("nanogpt", "llmc"):  # these formats fix the dtype (llm.c ids stay clear of the BOS)
        docs = [[t % 50000 + 2 for t in b] for b in docs]
    with tempfile.TemporaryDirectory() as tmp:
        path, kwargs, expected = layout(fmt, docs, dtype, Path(tmp))
        source = open_token_files(str(path), **kwargs)
        assert as_lists(source) == expected
        assert source.doc_lens.tolist() == [len(e) for e in expected]
        assert source.doc_lens.dtype == np.int64 and len(source) == len(expected)
        assert source.num_tokens == sum(map(len, expected))
        again = pickle.loads(pickle.dumps(source))
        assert as_lists(again) == expected


def naive_offsets(tokens, eos, bos):
    cuts = {0, len(tokens)}
    for i, t in enumerate(tokens):
        if t == eos:
            cuts.add(i + 1)
        if t == bos:
            cuts.add(i)
    return sorted(cuts) if tokens else [0]


@given(
    st.lists(st.integers(0, 3), max_size=60),
    st.sampled_from([(0, None), (None, 1), (0, 1), (2, 2)]),
    st.integers(1, 7),
)
def test_scan_matches_a_token_by_token_reference(tokens, ids, chunk):
    eos, bos = ids
    with mock.patch.object(scan, "CHUNK_TOKENS", chunk):  # boundaries on chunk edges too
        got = scan_offsets(np.asarray(tokens, dtype=np.uint16), eos, bos)
    assert got.dtype == np.int64
    assert got.tolist() == naive_offsets(tokens, eos, bos)


def test_directory_of_mixed_formats_order_sniffing_and_provenance(tmp_path):
    write_numpy(tmp_path / "a.npy", [[5, 6, EOS], [7, EOS]], "uint16")
    write_megatron(tmp_path / "b", [[8, 9], [10]], "int32")
    write_llmc(tmp_path / "c.bin", [[50256, 11, EOS], [50256, 12, 13, EOS]])
    write_numpy(tmp_path / "d.bin", [[14, EOS], [15]], "uint16")
    (tmp_path / "sub").mkdir()
    write_numpy(tmp_path / "sub" / "e.npy", [[16, 17, 18], []], "uint16", sidecar=True)
    names = ["a.npy", "b.bin", "b.idx", "c.bin", "d.bin", "sub/e.npy"]
    assert [sniff_format(str(tmp_path / n)) for n in names] == [
        "numpy", "megatron", "megatron", "llmc", "nanogpt", "numpy"
    ]
    # given delimiters override llm.c's default BOS; the Megatron index ignores them
    src = open_token_files(tmp_path, dtype="uint16", eos_token_id=EOS)
    assert as_lists(src) == [
        [5, 6, 0], [7, 0], [8, 9], [10], [50256, 11, 0], [50256, 12, 13, 0], [14, 0], [15], [16, 17, 18], []
    ]
    assert [Path(f.path).name for f in src.files] == ["a.npy", "b.bin", "c.bin", "d.bin", "e.npy"]
    assert [f.dtype for f in src.files] == [np.uint16, np.int32, np.uint16, np.uint16, np.uint16]
    for i in range(len(src)):
        p = src.provenance(i)
        dtype = next(f.dtype for f in src.files if f.path == p.path)
        raw = np.fromfile(p.path, dtype=dtype, count=len(src[i]), offset=p.byte_offset)
        assert raw.tolist() == src[i].tolist()
    assert [tuple(src.provenance(i))[1:] for i in (0, 1, 3, 4, 5, 7)] == [
        (0, 0, 0), (1, 3, 6), (1, 2, 8), (0, 0, 1024), (1, 3, 1030), (1, 2, 4)
    ]
    assert src[-1].size == 0 and src[-2].tolist() == [16, 17, 18]
    glob_src = open_token_files([str(tmp_path / "*.npy"), str(tmp_path / "b")], dtype="uint16", eos_token_id=EOS)
    assert as_lists(glob_src) == [[5, 6, 0], [7, 0], [8, 9], [10]]


def patch_bytes(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_truncated_files_name_the_file_and_sizes(tmp_path):
    raw = write_numpy(tmp_path / "r.npy", [[3, 4, EOS]], "uint16")
    with open(raw, "ab") as f:
        f.write(b"\x07")  # half a token
    with pytest.raises(ValueError, match=r"r\.npy is truncated: 7 bytes is not a whole number of uint16"):
        open_token_files(raw, dtype="uint16", eos_token_id=EOS)
    llmc = write_llmc(tmp_path / "l.bin", [[50256, 5, 6, 7]])
    os.truncate(llmc, os.path.getsize(llmc) - 2)
    with pytest.raises(ValueError, match=r"l\.bin is truncated or overlong: its header counts 4 tokens \(1032 bytes\) "
                                         r"but the file has 1030 bytes"):
        open_token_files(llmc)
    os.truncate(llmc, 100)
    with pytest.raises(ValueError, match=r"l\.bin is truncated: 100 bytes, shorter than the 1024-byte llm.c header"):
        open_token_files(llmc, format="llmc")
    _, bin_path = write_megatron(tmp_path / "m", [[1, 2, 3], [4, 5]], "uint16")
    os.truncate(bin_path, 8)
    with pytest.raises(ValueError, match=r"m\.idx: sequence 1 spans bytes \[6, 10\) but .*m\.bin has 8 bytes"):
        open_token_files(tmp_path / "m.idx")


def test_wrong_magic_or_version(tmp_path):
    llmc = write_llmc(tmp_path / "l.bin", [[50256, 5]])
    patch_bytes(llmc, 4, struct.pack("<i", 3))
    with pytest.raises(ValueError, match=r"l\.bin has llm.c gpt-2 version 3; expected 1"):
        open_token_files(llmc)
    patch_bytes(llmc, 0, struct.pack("<i", 1234))
    with pytest.raises(ValueError, match=r"l\.bin is not an llm.c shard: magic 1234, expected one of 20240520"):
        open_token_files(llmc, format="llmc")
    idx, _ = write_megatron(tmp_path / "m", [[1, 2]], "uint16")
    patch_bytes(idx, 9, struct.pack("<Q", 2))
    with pytest.raises(ValueError, match=r"m\.idx has index version 2; only version 1"):
        open_token_files(idx)
    patch_bytes(idx, 0, b"MMIDIDY")
    with pytest.raises(ValueError, match=r"m\.idx is not a Megatron index: magic b'MMIDIDY"):
        open_token_files(idx)
    idx, _ = write_megatron(tmp_path / "f", [[1, 2]], "uint16")
    patch_bytes(idx, 17, bytes([6]))
    with pytest.raises(ValueError, match=r"f\.idx holds float64 values \(dtype code 6\)"):
        open_token_files(idx)


def test_megatron_index_disagreeing_with_its_bin(tmp_path):
    idx, bin_path = write_megatron(tmp_path / "m", [[1, 2, 3], [4, 5], [6]], "uint16")
    pointers_at = 34 + 3 * 4
    patch_bytes(idx, pointers_at + 8, struct.pack("<q", 12))  # sequence 1 moved past the end
    with pytest.raises(ValueError, match=r"sequence 1 spans bytes \[12, 16\) but .*m\.bin has 12 bytes"):
        open_token_files(idx)
    patch_bytes(idx, pointers_at + 8, struct.pack("<q", 4))  # inside, but overlapping sequence 0
    with pytest.raises(ValueError, match=r"sequence 1 starts at byte 4, not right after the previous one \(byte 6\)"):
        open_token_files(idx)
    patch_bytes(idx, pointers_at + 8, struct.pack("<q", 6))
    assert as_lists(open_token_files(idx)) == [[1, 2, 3], [4, 5], [6]]
    with open(bin_path, "ab") as f:
        f.write(b"\0\0")  # tokens no document covers
    with pytest.raises(ValueError, match=r"m\.bin has 14 bytes but its index covers 12"):
        open_token_files(idx)
    idx, _ = write_megatron(tmp_path / "d", [[1], [2]], "uint16", document_indices=[0, 2, 1])
    with pytest.raises(ValueError, match=r"document_indices must rise from 0 to the sequence count 2, got \[0, 2, 1\]"):
        open_token_files(idx)
    with open(idx, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=r"d\.idx is 83 bytes, but a header of 2 sequences and 3 document indices needs 82 \(or 84 with modes\)"):
        open_token_files(idx)


@pytest.mark.parametrize(
    "rows, message",
    [
        ("0,2\n3,4\n", r"row 1 starts at 3, but the previous document ends at 2"),
        ("0,2\n2,1\n", r"row 1 ends at 1, before its start 2"),
        ("0,2\n2,9\n", r"row 1 ends at 9, past the file's 5 tokens"),
        ("1,2\n", r"row 0 starts at 1, but the previous document ends at 0"),
        ("0,x\n", r"is not 'start,end' integer rows"),
    ],
)
def test_sidecar_disagreeing_with_the_token_file(tmp_path, rows, message):
    path = write_numpy(tmp_path / "s.npy", [[3, 4, 5, 6, 7]], "uint16")
    with gzip.open(tmp_path / "s.csv.gz", "wt") as f:
        f.write(rows)
    with pytest.raises(ValueError, match=r"sidecar .*s\.csv\.gz.*" + message):
        open_token_files(path, dtype="uint16")


def test_sidecar_extra_columns_and_tail(tmp_path):
    path = write_numpy(tmp_path / "s.npy", [[3, 4, 5, 6, 7]], "uint32")
    with gzip.open(tmp_path / "s.csv.gz", "wt") as f:
        f.write("0,2,doc-a,src\n2,3,doc-b,src\n")  # Dolma rows carry more columns; tokens 3: tail
    assert as_lists(open_token_files(path, dtype="uint32")) == [[3, 4], [5], [6, 7]]


def test_ids_checked_against_dtype_and_vocab(tmp_path):
    path = write_numpy(tmp_path / "v.npy", [[3, 4, EOS], [9, 700, EOS]], "uint16")
    src = open_token_files(path, dtype="uint16", eos_token_id=EOS, vocab_size=512)
    assert src[0].tolist() == [3, 4, 0]
    with pytest.raises(ValueError, match=r"v\.npy: document 1 holds token id 700, outside \[0, 511\] \(vocab_size=512\)"):
        src[1]
    with pytest.raises(ValueError, match=r"v\.npy: document 1 holds token id 700"):
        src.gather([0, 1], [0, 0], [3, 3])
    with pytest.raises(ValueError, match=r"eos_token_id=600 cannot occur in .*v\.npy: its ids are uint16 in \[0, 511\]"):
        open_token_files(path, dtype="uint16", eos_token_id=600, vocab_size=512)
    with pytest.raises(ValueError, match=r"eos_token_id=70000 cannot occur .* uint16 in \[0, 65535\]"):
        open_token_files(path, dtype="uint16", eos_token_id=70000)
    idx, _ = write_megatron(tmp_path / "n", [[5, -3, 2]], "int16")
    with pytest.raises(ValueError, match=r"n\.bin: document 0 holds token id -3, outside \[0, 32767\]"):
        open_token_files(idx)[0]
    wide = write_numpy(tmp_path / "w.npy", [np.array([2**63 + 5, EOS], dtype=np.uint64)], "uint64")
    with pytest.raises(ValueError, match=r"token id 9223372036854775813, outside \[0, 9223372036854775807\]"):
        open_token_files(wide, dtype="uint64", eos_token_id=EOS)[0]


def test_argument_errors(tmp_path):
    path = write_numpy(tmp_path / "a.npy", [[3, EOS]], "uint16")
    with pytest.raises(ValueError, match=r"a\.npy is a headerless token file: pass its dtype"):
        open_token_files(path, eos_token_id=EOS)
    with pytest.raises(ValueError, match=r"a\.npy has no index or .csv.gz sidecar: pass eos_token_id or bos_token_id"):
        open_token_files(path, dtype="uint16")
    with pytest.raises(ValueError, match=r"dtype must be one of uint8, uint16, uint32, uint64, got 'float32'"):
        open_token_files(path, dtype="float32", eos_token_id=EOS)
    with pytest.raises(ValueError, match=r"format must be one of .* got 'arrow'"):
        open_token_files(path, format="arrow")
    with pytest.raises(ValueError, match=r"eos_token_id must be a non-negative integer, got -1"):
        open_token_files(path, dtype="uint16", eos_token_id=-1)
    with pytest.raises(ValueError, match=r"vocab_size must be a positive integer, got 0"):
        open_token_files(path, dtype="uint16", eos_token_id=EOS, vocab_size=0)
    with pytest.raises(FileNotFoundError, match=r"no such file or directory: .*missing\.npy"):
        open_token_files(tmp_path / "missing.npy", dtype="uint16")
    with pytest.raises(FileNotFoundError, match=r"no files match .*\*\.idx"):
        open_token_files(str(tmp_path / "*.idx"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no .npy/.bin/.idx token files"):
        open_token_files(tmp_path / "empty")
    src = open_token_files(path, dtype="uint16", eos_token_id=EOS)
    with pytest.raises(IndexError, match=r"document 1 out of range for a source of 1 documents"):
        src.tokens(1)
    with pytest.raises(IndexError, match=r"tokens \[1, 3\) outside document 0 of 2"):
        src.tokens(0, 1, 2)
    for bad in (([-1], [0], [1]), ([0], [-1], [1]), ([0], [0], [-1]), ([0], [1], [2])):
        with pytest.raises(IndexError, match=r"outside document"):
            src.gather(*bad)
    assert src.gather([0, 0], [1, 0], [1, 2]).tolist() == [0, 3, 0]
    state = pickle.dumps(src)
    write_numpy(path, [[3, 4, EOS]], "uint16")  # the file changes under a pickled source
    with pytest.raises(ValueError, match=r"a\.npy changed since it was opened \(size 4 -> 6 bytes\)"):
        pickle.loads(state)


def test_scan_is_cached_once_and_redone_when_the_file_changes(tmp_path):
    n = scan.CACHE_MIN_TOKENS + 10
    tokens = np.arange(n, dtype=np.uint32) % 1000  # an EOS (0) every 1000 tokens
    tokens.tofile(tmp_path / "big.npy")
    calls = []
    real_scan = scan.scan_offsets

    def counting(*args, **kwargs):
        calls.append(1)
        return real_scan(*args, **kwargs)

    with mock.patch.object(scan, "scan_offsets", counting):
        first = open_token_files(tmp_path / "big.npy", dtype="uint32", eos_token_id=0, cache=tmp_path / "c")
        again = open_token_files(tmp_path / "big.npy", dtype="uint32", eos_token_id=0, cache=tmp_path / "c")
        assert len(calls) == 1 and np.array_equal(first.offsets, again.offsets)
        assert len(list((tmp_path / "c" / "token_index").glob("*.npy"))) == 1
        other_eos = open_token_files(tmp_path / "big.npy", dtype="uint32", eos_token_id=1, cache=tmp_path / "c")
        assert len(calls) == 2 and other_eos.doc_lens[0] == 2
        ((tokens + 1) % 1000).tofile(tmp_path / "big.npy")  # same size, new content and mtime
        os.utime(tmp_path / "big.npy", ns=(1, 1))
        changed = open_token_files(tmp_path / "big.npy", dtype="uint32", eos_token_id=0, cache=tmp_path / "c")
        assert len(calls) == 3 and changed.doc_lens[0] == 1000
        open_token_files(tmp_path / "big.npy", dtype="uint32", eos_token_id=0, cache=False)
        assert len(calls) == 4
    assert first.doc_lens[0] == 1 and first.doc_lens[1] == 1000
