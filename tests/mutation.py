"""Mutation testing: plant classic bugs in a copy of cp_data and check that the tests catch each.

    python tests/mutation.py                   # every mutant, markdown table on stdout
    python tests/mutation.py --list            # the mutants and the tests each runs
    python tests/mutation.py --only llama3     # mutants whose name contains "llama3"
    python tests/mutation.py --root OTHER_TREE # mutate another checkout (e.g. an older commit)

For every mutant the source tree (``cp_data``, ``tests``, ``pipelines``, ``pyproject.toml``) is
copied into a temporary directory, one exact snippet of one module is replaced, and the mutant's
test files run there with ``pytest -x`` under the ``mutation`` hypothesis profile (the ``ci``
examples, no shrinking; override with ``--profile``). A mutant is *caught* when a test fails, *SURVIVED* when they all pass; *not
applied* means its snippet is no longer in the module (the code moved on: update the mutant).
Tests that already fail on the unmutated copy are deselected, so they cannot catch anything by
accident. Not collected by pytest (the file name does not start with ``test_``) and not part of
CI: it runs the test subsets once per mutant, some minutes in all.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
COPIED = ("cp_data", "tests", "pipelines", "pyproject.toml")

BALANCER_TESTS = ("tests/test_balancers.py", "tests/test_balancer_properties.py", "tests/test_survivors.py")
ATTENTION_TESTS = ("tests/test_attention.py", "tests/test_attention_dist.py")
STREAM_TESTS = ("tests/test_datasets.py", "tests/test_streaming.py", "tests/test_stream_boundaries.py")


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``old`` (exactly once in ``module``) becomes ``new``; ``tests`` should fail."""

    name: str
    module: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "zig_zag keeps chunks 2W-1-r and r (swapped)",
        "cp_data/balancers/zig_zag.py",
        "np.add(base, cp_rank * chunk, out=offset[:, 0])\n"
        "    np.add(base, (2 * cp_world_size - 2 - cp_rank) * chunk, out=offset[:, 1])",
        "np.add(base, (2 * cp_world_size - 1 - cp_rank) * chunk, out=offset[:, 0])\n"
        "    np.add(base, (cp_rank - 1) * chunk, out=offset[:, 1])",
        BALANCER_TESTS,
    ),
    Mutant(
        "zig_zag mirror chunk off by one (2W-2-r)",
        "cp_data/balancers/zig_zag.py",
        "np.add(base, (2 * cp_world_size - 2 - cp_rank) * chunk, out=offset[:, 1])",
        "np.add(base, (2 * cp_world_size - 3 - cp_rank) * chunk, out=offset[:, 1])",
        BALANCER_TESTS,
    ),
    Mutant(
        "zig_zag local cu_doc_lens at front-chunk ends",
        "cp_data/balancers/zig_zag.py",
        "np.cumsum(held, out=local_cu[1:])",
        "np.cumsum(chunk, out=local_cu[1:])",
        BALANCER_TESTS,
    ),
    Mutant(
        "llama3 padding with the wrong sign (upstream's defect)",
        "cp_data/balancers/llama3.py",
        "padded_len = round_up(seq_len, multiple)",
        "padded_len = seq_len + seq_len % multiple",
        BALANCER_TESTS,
    ),
    Mutant(
        "llama3 local_k_slice starts at the rank's slice",
        "cp_data/balancers/llama3.py",
        "k_start = int(window[0])",
        "k_start = slice_start",
        BALANCER_TESTS,
    ),
    Mutant(
        "ulysses max_doc_len ignores the padding document",
        "cp_data/balancers/ulysses.py",
        "max_doc_len=max(int(lengths.max()) if len(lengths) else 0, padding),",
        "max_doc_len=int(lengths.max()) if len(lengths) else 0,",
        BALANCER_TESTS,
    ),
    Mutant(
        "ShardPlan pads an empty sequence with 0",
        "cp_data/balancers/plan.py",
        "return torch.full(shape, pad_value, dtype=x.dtype, device=x.device)",
        "return torch.zeros(shape, dtype=x.dtype, device=x.device)",
        BALANCER_TESTS,
    ),
    Mutant(
        "pad() reverses the values it keeps",
        "cp_data/balancers/plan.py",
        "torch.cat([x, x.new_full(shape, value)], dim=dim)",
        "torch.cat([x.flip(dim), x.new_full(shape, value)], dim=dim)",
        BALANCER_TESTS,
    ),
    Mutant(
        "unshard accepts positions covered twice",
        "cp_data/balancers/plan.py",
        "if seq_len and not bool((seen == 1).all()):",
        "if seq_len and not bool((seen >= 1).all()):",
        BALANCER_TESTS,
    ),
    Mutant(
        "balancer build(mesh) reads the global rank",
        "cp_data/balancers/types.py",
        "cp_rank=dist.get_rank(group)",
        "cp_rank=dist.get_rank()",
        ("tests/test_balancers.py", "tests/test_dp_cp.py"),
    ),
    Mutant(
        "collator from_mesh reads the global rank",
        "cp_data/collate.py",
        "cp_rank=dist.get_rank(group),",
        "cp_rank=dist.get_rank(),",
        ("tests/test_collate.py", "tests/test_dp_cp.py"),
    ),
    Mutant(
        "labels cross document boundaries",
        "cp_data/collate.py",
        "next_ok = positions[1:] != 0",
        "next_ok = torch.ones_like(positions[1:], dtype=torch.bool)",
        ("tests/test_collate.py",),
    ),
    Mutant(
        "labels read the mask of the current token, not the next",
        "cp_data/collate.py",
        "next_ok &= torch.cat(masks)[1:]",
        "next_ok &= torch.cat(masks)[:-1]",
        ("tests/test_collate.py",),
    ),
    Mutant(
        "positions start at 1",
        "cp_data/collate.py",
        "steps[0] = 0",
        "steps[0] = 1",
        ("tests/test_collate.py",),
    ),
    Mutant(
        "reordered row keeps the original document boundaries",
        "cp_data/collate.py",
        "positions[source_t], torch.from_numpy(new_cu).to(cu.dtype)",
        "positions[source_t], cu",
        ("tests/test_collate.py",),
    ),
    Mutant(
        "cp_multiple pads an aligned document by one more multiple",
        "cp_data/packing/config.py",
        "budget = round_up(real, m)",
        "budget = round_up(real + (m > 1), m)",
        ("tests/test_packing.py", "tests/test_survivors.py"),
    ),
    Mutant(
        "best fit breaks ties by bin order of arrival, not the lowest id",
        "cp_data/packing/bfd.py",
        "                members[room].sort()\n",
        "",
        ("tests/test_packing.py",),
    ),
    Mutant(
        "streaming resume replays the saved row",
        "cp_data/datasets/streaming.py",
        'buf["emitted"] = k + 1',
        'buf["emitted"] = k',
        STREAM_TESTS,
    ),
    Mutant(
        "sampler does not reshuffle between epochs",
        "cp_data/loader/sampler.py",
        "np.random.default_rng([self.seed, epoch])",
        "np.random.default_rng(self.seed)",
        ("tests/test_loader.py", "tests/test_sampler.py"),
    ),
    Mutant(
        "cp coordinate from the global rank (assumes a dp-major mesh)",
        "cp_data/loader/mesh.py",
        'mesh.get_local_rank("cp"), mesh.size(cp)',
        "mesh.get_rank() % mesh.size(cp), mesh.size(cp)",
        ("tests/test_loader.py", "tests/test_dp_cp.py"),
    ),
    Mutant(
        "verify_dp_cp_batch flags overlap only when samples and digests collide",
        "cp_data/loader/verify.py",
        "set(other) & set(indices) or other_digest == digest",
        "set(other) & set(indices) and other_digest == digest",
        ("tests/test_loader.py", "tests/test_dp_cp.py"),
    ),
    Mutant(
        "ring log-sum-exp merge in float32",
        "cp_data/attention/ring.py",
        "new_lse = torch.logaddexp(lse, block_lse)",
        "new_lse = torch.logaddexp(lse.float(), block_lse.float()).to(lse.dtype)",
        ATTENTION_TESTS,
    ),
    Mutant(
        "ring step mask: the own-rank sender counts as later",
        "cp_data/attention/ring.py",
        'masks["earlier"] if step <= rank else masks["later"]',
        'masks["earlier"] if step < rank else masks["later"]',
        ATTENTION_TESTS,
    ),
    Mutant(
        "ulysses all-to-all backward uses the forward dims",
        "cp_data/attention/comm.py",
        "return all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None",
        "return all_to_all(grad, scatter_dim, gather_dim, ctx.group), None, None, None",
        ATTENTION_TESTS,
    ),
]


def copy_tree(root: Path, into: Path) -> None:
    for name in COPIED:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, into / name, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
        elif src.exists():
            shutil.copy2(src, into / name)


def run_pytest(tree: Path, tests: list[str], deselect: list[str], profile: str | None, timeout: float):
    """``(exit code, node ids of failed tests, seconds)``; exit code None on timeout."""
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", CP_DATA_CACHE=str(tree / ".cache"))
    if profile:
        env["HYPOTHESIS_PROFILE"] = profile
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    cmd += [arg for node in deselect for arg in ("--deselect", node)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, [], time.perf_counter() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.MULTILINE)
    return proc.returncode, failed, time.perf_counter() - start


def existing(root: Path, tests: tuple[str, ...]) -> list[str]:
    return [t for t in tests if (root / t).exists()]


def baseline_failures(root: Path, test_files: list[str], profile: str | None, timeout: float) -> list[str]:
    """Tests that fail on the unmutated tree (each file runs to the end: no -x stop)."""
    failures = []
    with tempfile.TemporaryDirectory(prefix="cp_data_baseline_") as tmp:
        copy_tree(root, Path(tmp))
        for test in tqdm(test_files, desc="baseline", unit="file"):
            done: list[str] = []
            while True:  # -x stops at the first failure: deselect it and go on
                code, failed, _ = run_pytest(Path(tmp), [test], failures + done, profile, timeout)
                if code in (0, 5) or not failed:
                    break
                done += failed
            failures += done
    return failures


def run_mutant(mutant: Mutant, root: Path, deselect: list[str], profile: str | None, timeout: float) -> dict:
    tests = existing(root, mutant.tests)
    source = (root / mutant.module).read_text() if (root / mutant.module).exists() else ""
    result = dict(mutant=mutant, tests=tests, seconds=0.0, first_failure="")
    if source.count(mutant.old) != 1 or not tests:
        result["outcome"] = "not applied" if tests else "no tests"
        return result
    with tempfile.TemporaryDirectory(prefix="cp_data_mutant_") as tmp:
        copy_tree(root, Path(tmp))
        (Path(tmp) / mutant.module).write_text(source.replace(mutant.old, mutant.new))
        mine = [d for d in deselect if d.split("::")[0] in tests]
        code, failed, seconds = run_pytest(Path(tmp), tests, mine, profile, timeout)
    result["seconds"] = seconds
    if code is None:
        result["outcome"] = "caught (timeout)"
    elif code == 0:
        result["outcome"] = "SURVIVED"
    else:
        result["outcome"] = "caught"
        result["first_failure"] = failed[0] if failed else f"pytest exit code {code}"
    return result


def render(results: list[dict], root: Path, baseline: list[str]) -> str:
    lines = [
        f"Mutation testing of {root}",
        "",
        "| planted bug | module | tests run | result | first failing test | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["mutant"]
        tests = ", ".join(Path(t).name for t in r["tests"]) or "-"
        lines.append(
            f"| {m.name} | {m.module.removeprefix('cp_data/')} | {tests} | {r['outcome']} | "
            f"{r['first_failure'].removeprefix('tests/')} | {r['seconds']:.0f} |"
        )
    counts = {o: sum(r["outcome"].startswith(o) for r in results) for o in ("caught", "SURVIVED", "not applied")}
    lines += ["", ", ".join(f"{n} {o}" for o, n in counts.items())]
    if baseline:
        lines.append("deselected (already failing without a mutant): " + ", ".join(baseline))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=REPO, help="source tree to mutate (default: this checkout)")
    p.add_argument("--only", default="", help="run the mutants whose name contains this text")
    p.add_argument("--profile", default="mutation", help="HYPOTHESIS_PROFILE for the runs ('' leaves it unset)")
    p.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (each starts pytest)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = p.parse_args(argv)
    mutants = [m for m in MUTANTS if args.only in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.name}  [{m.module}]  -> {', '.join(m.tests)}")
        return 0
    root = args.root.resolve()
    files = sorted({t for m in mutants for t in existing(root, m.tests)})
    baseline = baseline_failures(root, files, args.profile or None, args.timeout)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        jobs = [pool.submit(run_mutant, m, root, baseline, args.profile or None, args.timeout) for m in mutants]
        results = [job.result() for job in tqdm(jobs, desc="mutants", unit="mutant")]
    print(render(results, root, baseline))
    return 1 if any(r["outcome"] == "SURVIVED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
