"""Packing benchmark: BFD and concat planning rate, fill, and map-style row building throughput.

Document lengths are long-tailed (lognormal, median ~700 tokens) with ~2% longer than S, which
are split into S-sized pieces. Targets: BFD >= 5e5 docs/s with fill >= 99%; building every row
of a map-style ``PackedDataset`` over an in-memory arrow dataset >= 1e7 tokens/s.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from cp_data.packing import PackingConfig

TARGET_BFD_DOCS_PER_S = 5e5
TARGET_FILL = 0.99
TARGET_TOKENS_PER_S = 1e7


def long_tailed_lengths(num_docs: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """Lognormal document lengths (median ~700), clipped to [1, 4*seq_len]; some exceed seq_len."""
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(mean=np.log(700), sigma=1.2, size=num_docs).astype(np.int64)
    return np.clip(lengths, 1, 4 * seq_len)


def _plan_rate(lengths: np.ndarray, config: PackingConfig) -> tuple[float, dict]:
    start = time.perf_counter()
    plan = config.build().plan(lengths)
    elapsed = time.perf_counter() - start
    return lengths.size / elapsed, plan.metrics()


def _in_memory_dataset(lengths: np.ndarray, seed: int):
    import datasets
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    values = rng.integers(0, 50_000, int(offsets[-1]), dtype=np.int32)
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    return datasets.Dataset(pa.table({"input_ids": column}))


def run(
    num_docs: int = 1_000_000,
    seq_len: int = 8192,
    dataset_tokens: int = 50_000_000,
    cp_multiple: Optional[int] = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Measure planning rates and fill on ``num_docs`` lengths, then map-style row throughput.

    ``dataset_tokens`` sizes the in-memory dataset whose rows are all built via ``__getitem__``;
    ``cp_multiple`` adds a CP-aware BFD run (e.g. 2W = 16 for zig_zag with W = 8).
    """
    from cp_data.datasets import PackedDataset

    steps = tqdm(total=5, desc="packing bench", disable=not progress)
    lengths = long_tailed_lengths(num_docs, seq_len, seed)
    steps.update()
    bfd_rate, bfd = _plan_rate(lengths, PackingConfig(seq_len))
    steps.update()
    concat_rate, concat = _plan_rate(lengths, PackingConfig(seq_len, algorithm="concat"))
    steps.update()
    cp = {}
    if cp_multiple:
        cp_rate, cp_metrics = _plan_rate(lengths, PackingConfig(seq_len, cp_multiple=cp_multiple))
        cp = {"bfd_cp_docs_per_s": cp_rate, "bfd_cp_fill": cp_metrics["fill_rate"]}
    steps.update()

    mean = max(1.0, float(lengths.mean()))
    ds_lengths = lengths[: max(1, min(num_docs, int(dataset_tokens / mean)))]
    dataset = _in_memory_dataset(ds_lengths, seed)
    start = time.perf_counter()
    packed = PackedDataset(dataset, PackingConfig(seq_len))
    plan_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = 0
    for i in tqdm(range(len(packed)), desc="build rows", leave=False, disable=not progress):
        tokens += packed[i]["input_ids"].numel()
    build_s = time.perf_counter() - start
    steps.update()
    steps.close()
    return {
        "num_docs": int(num_docs),
        "seq_len": int(seq_len),
        "tokens": int(lengths.sum()),
        "docs_longer_than_seq_len": int((lengths > seq_len).sum()),
        "bfd_docs_per_s": bfd_rate,
        "bfd_fill": bfd["fill_rate"],
        "bfd_rows": bfd["rows"],
        "concat_docs_per_s": concat_rate,
        "concat_fill": concat["fill_rate"],
        **cp,
        "dataset_docs": int(ds_lengths.size),
        "dataset_rows": len(packed),
        "dataset_plan_s": plan_s,
        "dataset_tokens_per_s": tokens / build_s,
        "ok": bool(
            bfd_rate >= TARGET_BFD_DOCS_PER_S
            and bfd["fill_rate"] >= TARGET_FILL
            and tokens / build_s >= TARGET_TOKENS_PER_S
        ),
    }


def main() -> None:
    """Run the default benchmark and print its figures against the targets."""
    r = run()
    print(f"documents: {r['num_docs']:,} (S = {r['seq_len']}, {r['tokens']:,} tokens, "
          f"{r['docs_longer_than_seq_len']:,} longer than S)")
    print(f"BFD plan:    {r['bfd_docs_per_s']:>14,.0f} docs/s  (target >= {TARGET_BFD_DOCS_PER_S:,.0f})"
          f"  fill {r['bfd_fill']:.4%} (target >= {TARGET_FILL:.0%}), {r['bfd_rows']:,} rows")
    if "bfd_cp_docs_per_s" in r:
        print(f"BFD + cp_multiple: {r['bfd_cp_docs_per_s']:>8,.0f} docs/s  fill {r['bfd_cp_fill']:.4%}")
    print(f"concat plan: {r['concat_docs_per_s']:>14,.0f} docs/s  fill {r['concat_fill']:.4%}")
    print(f"map-style rows: {r['dataset_tokens_per_s']:>11,.0f} tokens/s (target >= {TARGET_TOKENS_PER_S:,.0f})"
          f" over {r['dataset_rows']:,} rows of {r['dataset_docs']:,} docs")
    print("all targets met" if r["ok"] else "TARGET MISSED")


if __name__ == "__main__":
    main()
