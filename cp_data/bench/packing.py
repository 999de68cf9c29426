"""Packing benchmark: BFD and concat planning rate, fill, and map-style row building throughput.

Document lengths are long-tailed (lognormal, median ~700 tokens) with ~2% longer than S, which
are split into S-sized pieces. Targets: BFD >= 5e5 docs/s with fill >= 99%; building every row
of a map-style ``PackedDataset`` over an in-memory arrow dataset >= 1e7 tokens/s.

The work-aware part (:func:`work_balance`) measures what the work options of ``PackingConfig``
buy: the spread of row work (causal pairs) and, simulating the loader's plain split of
consecutive global batches over ``dp`` ranks (``batch_size`` rows each), the busiest rank's work
over the mean, per step.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from cp_data.packing import PackingConfig, work_bucket_order

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


WORK_MIXES = {
    "long-tailed (the mix above)": lambda n, s: long_tailed_lengths(n, s),
    "mid-length (lognormal median 1000, sigma 0.8, <= S/2)": lambda n, s: np.clip(
        np.random.default_rng(1).lognormal(np.log(1000), 0.8, n).astype(np.int64), 1, s // 2
    ),
}
"""Name -> lengths(num_docs, seq_len): with and without documents as long as a row."""

SPLITS = ((8, 1), (8, 4), (64, 1), (64, 4))
"""(dp, batch_size) of the simulated steps."""


def step_imbalance(row_work: np.ndarray, order: np.ndarray, dp: int, batch_size: int) -> np.ndarray:
    """max / mean over dp ranks of each step's work when the rows come in ``order``.

    As the loader's ``DataParallelSampler``: rank ``r`` takes ``order[r::dp]``, ``batch_size``
    rows per step; the tail that does not fill a step is dropped.
    """
    steps = order.size // (dp * batch_size)
    per_rank = row_work[order[: steps * dp * batch_size]].reshape(steps, batch_size, dp).sum(axis=1)
    return per_rank.max(axis=1) / per_rank.mean(axis=1)


def outlier_delay_order(row_work: np.ndarray, seed: int = 0, heavy_share: float = 0.1) -> np.ndarray:
    """Reference, not a library option: WLB-LLM's outlier delay as a row order.

    Rows shuffled, then the heaviest ``heavy_share`` of them held back and released evenly
    spaced along the order.
    """
    order = np.random.default_rng(seed).permutation(row_work.size)
    heavy = row_work[order] > np.quantile(row_work, 1 - heavy_share)
    slots = np.zeros(order.size, dtype=bool)
    slots[(np.arange(heavy.sum()) * order.size) // max(int(heavy.sum()), 1)] = True
    out = np.empty_like(order)
    out[slots], out[~slots] = order[heavy], order[~heavy]
    return out


def work_balance(num_docs: int = 100_000, seq_len: int = 8192, cap_factors=(1.5, 1.2), seed: int = 0) -> dict:
    """What each work option buys, per length mix: rows, fill, row work max/mean, per-step
    max/mean over dp ranks (mean and p90 over steps) for every ``(dp, batch_size)`` in
    :data:`SPLITS`, and the planning rate.

    Variants: BFD in plan order (``shuffle=False``) and shuffled (the loader's default); BFD with
    ``max_pairs`` at each factor x the mean row work (shuffled: a cap does not need an order);
    ``work_buckets`` (consumed in order); and the outlier-delay reference (shuffled).
    """
    out = {}
    shuffle = np.random.default_rng(seed).permutation
    for mix, lengths_of in WORK_MIXES.items():
        lengths = lengths_of(num_docs, seq_len)
        start = time.perf_counter()
        plain = PackingConfig(seq_len).build().plan(lengths)
        variants = {"bfd": (plain, time.perf_counter() - start, None)}
        mean_work = float(plain.row_pairs().mean())
        for factor in cap_factors:
            config = PackingConfig(seq_len, max_pairs=int(factor * mean_work))
            start = time.perf_counter()
            variants[f"bfd + max_pairs {factor}x mean"] = (config.build().plan(lengths), time.perf_counter() - start, None)
        work = plain.row_pairs()
        results = {}
        for name, (plan, seconds, _) in variants.items():
            row_work = plan.row_pairs()
            orders = {"shuffled": lambda dp, b, n=row_work.size: shuffle(n)}
            if name == "bfd":
                orders = {"plan order": lambda dp, b, n=row_work.size: np.arange(n), **orders}
            for how, order_of in orders.items():
                results[f"{name}, {how}"] = _figures(plan, row_work, order_of, seconds, lengths.size)
        results["bfd + work_buckets=dp x batch_size, in order"] = _figures(
            plain, work, lambda dp, b: work_bucket_order(work, dp * b, seed), None, lengths.size
        )
        results["outlier delay (WLB-LLM reference), in order"] = _figures(
            plain, work, lambda dp, b: outlier_delay_order(work, seed), None, lengths.size
        )
        out[mix] = results
    return out


def _figures(plan, row_work: np.ndarray, order_of, seconds, num_docs: int) -> dict:
    figures = dict(
        rows=plan.num_rows,
        fill=plan.metrics()["fill_rate"],
        row_work_max_over_mean=float(row_work.max() / row_work.mean()),
        row_work_p99_over_mean=float(np.quantile(row_work, 0.99) / row_work.mean()),
    )
    if seconds is not None:
        figures["docs_per_s"] = num_docs / seconds
    for dp, batch_size in SPLITS:
        steps = step_imbalance(row_work, order_of(dp, batch_size), dp, batch_size)
        figures[f"step dp={dp} B={batch_size}"] = dict(mean=float(steps.mean()), p90=float(np.quantile(steps, 0.9)))
    return figures


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
        "work_balance": work_balance(min(num_docs, 100_000), seq_len, seed=seed),
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
    splits = "  ".join(f"dp={dp},B={b}" for dp, b in SPLITS)
    print(f"work balance ({min(r['num_docs'], 100_000):,} docs): row work max/mean, p99/mean; per-step "
          f"busiest dp rank / mean, mean/p90 over steps for {splits}")
    for mix, variants in r["work_balance"].items():
        print(f"  {mix}")
        for name, f in variants.items():
            steps = "  ".join(f"{f[f'step dp={dp} B={b}']['mean']:.2f}/{f[f'step dp={dp} B={b}']['p90']:.2f}" for dp, b in SPLITS)
            rate = f"  {f['docs_per_s']:,.0f} docs/s" if "docs_per_s" in f else ""
            print(f"    {name:<48} rows {f['rows']:>6} fill {f['fill']:.4f} row {f['row_work_max_over_mean']:.2f} "
                  f"{f['row_work_p99_over_mean']:.2f} | {steps}{rate}")


if __name__ == "__main__":
    main()
