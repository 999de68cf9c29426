"""Where the inspected batches come from: local files, a saved HF dataset, or the embedded corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["SUFFIXES", "resolve_files", "load_documents", "pack_documents", "iter_batches"]

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
    from datasets.exceptions import DatasetGenerationError

    from cp_data.datasets import load_text_files

    builder, files = resolve_files(paths)
    if builder == "saved":
        ds = datasets.load_from_disk(str(files[0]))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{files[0]} holds splits {list(ds)}; expected a 'train' split")
            ds = ds["train"]
        return ds
    try:
        kwargs = {"sample_by": "document"} if doc_per_file and builder == "text" else {}
        return load_text_files([str(f) for f in files], file_format=builder, cache_dir=cache_dir, **kwargs)
    except DatasetGenerationError as exc:  # unreadable content (bad JSON, an empty file)
        names = ", ".join(str(f) for f in files)
        raise ValueError(f"cannot read {names} as {builder}: {exc.__cause__ or exc}") from exc


def pack_documents(
    dataset, config: Any, *, tokenizer: Any = "bpe", text_column: str = "text", cache_dir: Any = None
):
    """Tokenise (unless the dataset already has ``input_ids``) and pack into a ``PackedDataset``.

    ``config`` is a ``PackingConfig`` (or a bare row length). Returns ``(packed, tokenizer)``;
    the tokenizer is ``None`` when the dataset came tokenised.
    """
    from cp_data.datasets import PackedDataset, get_tokenizer, tokenize_dataset

    if "input_ids" in (dataset.column_names or []):
        return PackedDataset(dataset, config), None
    if text_column not in (dataset.column_names or []):
        raise ValueError(
            f"column {text_column!r} not found; the dataset has columns {dataset.column_names} "
            "(pick one with --text-column)"
        )
    feature = dataset.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"column {text_column!r} holds {feature}, not text (pick one with --text-column)")
    tok = get_tokenizer(tokenizer, cache_dir=cache_dir)
    dataset = dataset.filter(lambda b: [bool(t) for t in b[text_column]], batched=True, desc="drop empty")
    ids = tokenize_dataset(dataset, tok, text_column=text_column)
    return PackedDataset(ids, config), tok


def iter_batches(packed, batch_size: int, num_batches: int) -> Iterator[list[dict]]:
    """Up to ``num_batches`` consecutive batches of ``batch_size`` packed instances."""
    if batch_size < 1 or num_batches < 1:
        raise ValueError(f"batch_size and num_batches must be >= 1, got {batch_size} and {num_batches}")
    for b in range(min(num_batches, len(packed) // batch_size)):
        yield [packed[i] for i in range(b * batch_size, (b + 1) * batch_size)]
