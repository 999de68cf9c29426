"""An embedded default corpus (text shipped with Python itself) and loaders for local text files.

Nothing is downloaded: documents come from ``pydoc_data.topics`` (one per help topic) and the
standard library's ``.py`` files (a long-tailed code corpus). They are written once as JSON Lines
into a user cache dir and read back through ``datasets.load_dataset("json", ...)``, the same path
that serves users' own files.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import datasets
import pyarrow as pa
import tokenizers
from datasets.exceptions import DatasetGenerationError

from cp_data.cache import default_cache_dir
from cp_data.packing import PackingConfig

from .packed import PackedDataset, as_config
from .streaming import PackedIterableDataset
from .tokenize import ByteTokenizer, tokenize_dataset

__all__ = [
    "default_cache_dir",
    "load_default_corpus",
    "load_text_files",
    "packed_dataset_from_files",
    "train_bpe",
    "get_tokenizer",
]

CORPUS_VERSION = 1
_PY = f"py{sys.version_info.major}{sys.version_info.minor}"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def _pydoc_docs():
    from pydoc_data.topics import topics

    return ({"name": f"pydoc:{k}", "text": topics[k]} for k in sorted(topics))


def _stdlib_docs(include_tests: bool):
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = _SKIP_DIRS | (set() if include_tests else _TEST_DIRS)
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts[:-1]):
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        yield {"name": f"stdlib:{rel.as_posix()}", "text": text}


def _corpus_file(kind: str, include_tests: bool, cache: Path) -> Path:
    suffix = "-tests" if include_tests and kind != "pydoc" else ""
    path = cache / "corpus" / f"{kind}{suffix}-{_PY}-v{CORPUS_VERSION}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        docs = []
        if kind in ("pydoc", "both"):
            docs.append(_pydoc_docs())
        if kind in ("stdlib", "both"):
            docs.append(_stdlib_docs(include_tests))
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("w", encoding="utf-8") as f:
            for source in docs:
                for doc in source:
                    f.write(json.dumps(doc) + "\n")
        tmp.replace(path)  # atomic: concurrent callers never see half a file
    return path


def train_bpe(vocab_size: int = 8192, cache_dir: Union[str, Path, None] = None) -> tokenizers.Tokenizer:
    """A byte-level BPE trained locally on the pydoc topics (about a second), cached on disk.

    ``<|endoftext|>`` is id 0 and doubles as EOS.
    """
    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"vocab_size must be an integer >= 257, got {vocab_size!r}")
    path = default_cache_dir(cache_dir) / f"bpe-{vocab_size}-{_PY}-v{CORPUS_VERSION}.json"
    if path.exists():
        return tokenizers.Tokenizer.from_file(str(path))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d["text"] for d in _pydoc_docs()), trainer=trainer)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    tmp.replace(path)
    return tok


def get_tokenizer(tokenizer: Any = "bpe", vocab_size: int = 8192, cache_dir=None) -> Any:
    """``"bpe"`` (local byte-level BPE), ``"bytes"`` (:class:`ByteTokenizer`), or a tokenizer as is."""
    if tokenizer == "bpe":
        return train_bpe(vocab_size, cache_dir)
    if tokenizer == "bytes":
        return ByteTokenizer()
    if isinstance(tokenizer, str):
        raise ValueError(f"tokenizer must be 'bpe', 'bytes' or a tokenizer object, got {tokenizer!r}")
    return tokenizer


def load_text_files(
    data_files: Union[str, Sequence[str]],
    *,
    file_format: Optional[Literal["text", "json", "parquet"]] = None,
    streaming: bool = False,
    cache_dir=None,
    **load_kwargs,
):
    """Local files as a HF dataset via ``load_dataset("text"|"json"|"parquet", data_files=...)``.

    The format follows the extension (``.json``/``.jsonl`` -> json, ``.parquet`` -> parquet,
    otherwise text, one document per line; pass ``sample_by="document"`` for one per file). Glob
    patterns are allowed. HF caches stay in the cp_data cache.

    Raises ``ValueError`` naming the file when the files hold no documents (empty, only blank
    lines, no rows) or a file cannot be read (malformed JSON, binary data), with the cause. A
    streaming dataset reads lazily, so only the empty-file check happens here.
    """
    files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    if not files:
        raise ValueError("data_files is empty")
    if file_format is None:
        suffix = Path(files[0]).suffix.lower()
        file_format = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(suffix, "text")
    if file_format not in ("text", "json", "parquet"):
        raise ValueError(f"file_format must be 'text', 'json' or 'parquet', got {file_format!r}")
    files = [str(f) for f in files]
    matches = [_local_files(f) for f in files]
    local = [path for m in matches for path in m]
    if file_format != "parquet" and all(matches) and not any(map(_holds_text, local)):
        raise ValueError(_no_documents(local, "is empty or holds only blank lines"))

    def load(data: list[str], streaming: bool):
        return datasets.load_dataset(
            file_format,
            data_files=data,
            split="train",
            streaming=streaming,
            cache_dir=str(default_cache_dir(cache_dir) / "hf"),
            **load_kwargs,
        )

    try:
        ds = load(files, streaming)
    except (DatasetGenerationError, pa.ArrowException) as exc:  # ArrowInvalid is a ValueError too
        named = [str(p) for p in local] if all(matches) else files
        culprit = named[0] if len(named) == 1 else _first_unreadable(named, lambda f: list(load([f], True)))
        cause = exc.__cause__ or exc
        raise ValueError(f"cannot read {culprit or ', '.join(named)} as {file_format}: {cause}") from exc
    except ValueError as exc:
        if "corresponds to no data" not in str(exc):  # datasets' words for "no rows at all"
            raise
        raise ValueError(_no_documents(local or files, "has no rows")) from None
    if not streaming and len(ds) == 0:
        raise ValueError(_no_documents(local or files, "has no rows"))
    return ds


def _local_files(pattern: str) -> list[Path]:
    """The local files that ``pattern`` names (a path or a glob pattern); [] for anything else."""
    if Path(pattern).is_file():
        return [Path(pattern)]
    if not any(c in pattern for c in "*?["):
        return []
    return [Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if Path(m).is_file()]


def _holds_text(path: Path) -> bool:
    """Whether the file has a byte other than whitespace (reads only up to the first one)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _no_documents(files: Sequence[Union[str, Path]], why: str) -> str:
    if len(files) == 1:
        return f"{files[0]} holds no documents: the file {why}"
    return f"{', '.join(map(str, files))} hold no documents: each file {why}"


def _first_unreadable(files: Sequence[str], read) -> Optional[str]:
    """The first of ``files`` that ``read`` fails on (only called once reading them all failed)."""
    for f in files:
        try:
            read(f)
        except Exception:  # noqa: BLE001 - any failure names the culprit; the caller has the cause
            return f
    return None


def load_default_corpus(
    kind: Literal["pydoc", "stdlib", "both"] = "pydoc",
    tokenizer: Any = "bpe",
    *,
    vocab_size: int = 8192,
    include_tests: bool = False,
    num_proc: Optional[int] = None,
    cache_dir=None,
) -> datasets.Dataset:
    """The embedded corpus as a ``datasets.Dataset`` with ``name`` and ``input_ids`` (EOS-ended).

    ``kind``: ``"pydoc"`` (79 help topics, ~0.5 MB), ``"stdlib"`` (the standard library's ``.py``
    files, long-tailed; ``include_tests`` adds the test suites) or ``"both"``.
    """
    if kind not in ("pydoc", "stdlib", "both"):
        raise ValueError(f"kind must be 'pydoc', 'stdlib' or 'both', got {kind!r}")
    cache = default_cache_dir(cache_dir)
    ds = load_text_files(_corpus_file(kind, include_tests, cache), file_format="json", cache_dir=cache)
    tok = get_tokenizer(tokenizer, vocab_size, cache)
    out = tokenize_dataset(ds, tok, num_proc=num_proc, keep_columns=True)
    return out.remove_columns("text")


def packed_dataset_from_files(
    data_files: Union[str, Sequence[str]],
    config: Union[PackingConfig, int],
    *,
    tokenizer: Any = "bpe",
    text_column: str = "text",
    streaming: bool = False,
    num_proc: Optional[int] = None,
    cache_dir=None,
    **load_kwargs,
) -> Union[PackedDataset, PackedIterableDataset]:
    """Load local text/json files, tokenise ``text_column`` and pack: map-style, or streaming."""
    ds = load_text_files(data_files, streaming=streaming, cache_dir=cache_dir, **load_kwargs)
    tok = get_tokenizer(tokenizer, cache_dir=cache_dir)
    ids = tokenize_dataset(ds, tok, text_column=text_column, num_proc=None if streaming else num_proc)
    cls = PackedIterableDataset if streaming else PackedDataset
    return cls(ids, as_config(config))
