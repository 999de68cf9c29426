"""Where the inspected batches come from: local files, a saved HF dataset, or the embedded corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .metrics import plural

__all__ = [
    "SUFFIXES",
    "resolve_files",
    "load_documents",
    "pack_documents",
    "sample_batches",
    "describe_sample",
    "describe_packing",
]

SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""Supported file suffixes and the HF builder that reads them."""


def _is_saved_dataset(path: Path) -> bool:
    """A ``save_to_disk`` directory: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def resolve_files(paths: Sequence[str | Path]) -> tuple[str, list[Path]]:
    """The HF builder (text/json/parquet, or ``"saved"`` for a ``save_to_disk`` dir) and the files.

    A directory that is not a saved dataset contributes its supported files (recursively). Raises
    ``FileNotFoundError`` for a missing path and ``ValueError`` for unsupported or mixed formats.
    """
    if not paths:
        raise ValueError("no input given: pass files or a directory")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {raw}")
        if _is_saved_dataset(path):
            if len(paths) > 1:
                raise ValueError(f"{raw} is a saved dataset; inspect it on its own")
            return "saved", [path]
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in SUFFIXES and p.is_file()
                # the metadata files of a saved dataset below are not documents
                and not any(_is_saved_dataset(q) for q in p.parents if q.is_relative_to(path))
            )
            if not found:
                raise ValueError(f"{raw} holds no {'/'.join(sorted(SUFFIXES))} files")
            files += found
        else:
            if path.suffix.lower() not in SUFFIXES:
                raise ValueError(
                    f"unsupported file type {path.suffix or '(none)'!r} for {raw}; "
                    f"expected one of {sorted(SUFFIXES)}"
                )
            files.append(path)
    builders = {SUFFIXES[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise ValueError(f"mixed file formats {sorted(builders)}; inspect one format at a time")
    return builders.pop(), files


def load_documents(paths: Sequence[str | Path], *, doc_per_file: bool = False, cache_dir: Any = None):
    """A ``datasets.Dataset`` of the documents in ``paths`` (see :func:`resolve_files`).

    Text files give one document per line, or one per file with ``doc_per_file``.
    """
    import datasets

    from cp_data.datasets import load_text_files

    builder, files = resolve_files(paths)
    if builder != "saved":
        kwargs = {"sample_by": "document"} if doc_per_file and builder == "text" else {}
        return load_text_files([str(f) for f in files], file_format=builder, cache_dir=cache_dir, **kwargs)
    ds = datasets.load_from_disk(str(files[0]))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{files[0]} holds splits {list(ds)}; expected a 'train' split")
        ds = ds["train"]
    if len(ds) == 0:
        raise ValueError(f"{files[0]} holds no documents: the saved dataset has no rows")
    return ds


def pack_documents(
    dataset,
    config: Any,
    *,
    tokenizer: Any = "bpe",
    text_column: str = "text",
    cache_dir: Any = None,
    name: str = "the dataset",
):
    """Tokenise (unless the dataset already has ``input_ids``) and pack into a ``PackedDataset``.

    ``config`` is a ``PackingConfig`` (or a bare row length). Null and empty texts stay in as
    empty documents, so the packing metrics count them (``documents``, ``empty_docs_skipped``).
    Raises ``ValueError`` naming ``name`` when no document holds a token. Returns
    ``(packed, tokenizer)``; the tokenizer is ``None`` when the dataset came tokenised.
    """
    from cp_data.datasets import PackedDataset, get_tokenizer, tokenize_dataset

    columns = dataset.column_names or []
    column = "input_ids" if "input_ids" in columns else text_column
    if column not in columns:
        raise ValueError(
            f"column {text_column!r} not found; the dataset has columns {columns} (pick one with --text-column)"
        )
    feature = dataset.features[column]
    if column == text_column and getattr(feature, "dtype", None) not in ("string", "large_string", "null"):
        raise ValueError(f"column {text_column!r} holds {feature}, not text (pick one with --text-column)")
    if _count_nonempty(dataset, column) == 0:
        raise ValueError(
            f"{name} holds no documents: all {len(dataset)} {column!r} values are empty or null"
        )
    if column == "input_ids":
        return PackedDataset(dataset, config), None
    tok = get_tokenizer(tokenizer, cache_dir=cache_dir)
    return PackedDataset(tokenize_dataset(dataset, tok, text_column=text_column), config), tok


def _count_nonempty(dataset, column: str) -> int:
    """Rows of ``column`` (text or token lists) neither null nor empty, counted in arrow; -1 for other types."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = dataset.with_format("arrow")[column]
    if isinstance(values, pa.Table):
        values = values.column(column)
    typ = values.type
    if pa.types.is_null(typ):
        return 0
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        lengths = pc.utf8_length(values)
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        lengths = pc.list_value_length(values)
    else:  # not token lists: the packed dataset's own check names the type
        return -1
    return int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)


def sample_batches(
    num_rows: int, batch_size: int, num_batches: int | None, *, seed: int = 0
) -> list[list[int]]:
    """Row indices of the batches to inspect, ``batch_size`` rows each, seeded.

    Packing puts rows in no neutral order (best-fit-decreasing fills the first rows with the
    longest documents), so the first rows are a biased sample. With ``num_batches`` the rows are
    spread over the whole packed dataset: one row drawn at random from each of
    ``num_batches * batch_size`` equal stretches, then shuffled into batches, as a shuffling
    loader would group them. With ``num_batches=None``, every row in a random order, grouped
    into full batches (the rows that do not fill a last batch are left out, as ``drop_last``
    does). Fewer batches come back when the dataset is too small; none when it has fewer than
    ``batch_size`` rows.
    """
    if batch_size < 1 or (num_batches is not None and num_batches < 1):
        raise ValueError(f"batch_size and num_batches must be >= 1, got {batch_size} and {num_batches}")
    rng = np.random.default_rng(seed)
    fit = num_rows // batch_size
    count = batch_size * (fit if num_batches is None else min(num_batches, fit))
    if count == num_rows or num_batches is None:
        rows = rng.permutation(num_rows)[:count]
    else:
        edges = np.linspace(0, num_rows, count + 1).astype(np.int64)
        rows = rng.permutation(edges[:-1] + (rng.random(count) * np.diff(edges)).astype(np.int64))
    return rows.reshape(-1, batch_size).tolist()


def describe_sample(rows: list[list[int]], num_rows: int, num_batches: int | None, *, seed: int) -> str:
    """The ``sample:`` line of a report: which of the ``num_rows`` packed rows :func:`sample_batches`
    drew into ``rows`` (``num_batches`` as asked for; None for every row)."""
    used = sum(map(len, rows))
    batches = f"{plural(len(rows), 'batch')} of {plural(len(rows[0]) if rows else 0, 'row')}"
    if num_batches is None or used == num_rows:
        left = f"; {plural(num_rows - used, 'row')} left over (not a full batch)" if used < num_rows else ""
        return f"sample: all {plural(num_rows, 'packed row')} as {batches}, in random order (seed {seed}){left}"
    fewer = f" (only {len(rows)} fit)" if len(rows) < num_batches else ""
    return (
        f"sample: {batches}{fewer}, {used} of {num_rows} packed rows: one at random from each of {used} "
        f"equal stretches (seed {seed}); --all for every row"
    )


def describe_packing(packed) -> str:
    """``"N documents (k empty, skipped) -> R rows of S tokens"``, from the packing's own counts."""
    m = packed.metrics()
    empty = f" ({m['empty_docs_skipped']} empty, skipped)" if m["empty_docs_skipped"] else ""
    return (
        f"{plural(m['documents'], 'document')}{empty} -> {plural(m['rows'], 'row')} of "
        f"{packed.config.seq_len} tokens"
    )
