"""The README and the docstrings say what the code does, and stand on their own."""

import re
import shlex
from pathlib import Path

import pytest
import torch

from cp_data import ContextParallelCollator
from cp_data.packing import PackingConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    end = README.find("\n#", start + len(title) + 2)
    return README[start : end if end >= 0 else None]


def bash_lines(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_no_docstring_cites_a_file_users_never_get():
    sources = [*ROOT.joinpath("cp_data").rglob("*.py"), *ROOT.joinpath("pipelines").glob("*.py")]
    cited = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"SPEC\b|§", line)
    ]
    assert cited == []


def test_readme_commands_need_only_python3_and_ci_runs_the_test_one():
    demo, tests = bash_lines(section("## Two commands"))
    for command in (demo, tests):
        first, *rest = [part.strip() for part in command.split("&&")]
        assert first == "python3 -m venv .venv"
        assert all(part.startswith(".venv/bin/python -m ") for part in rest)
        assert shlex.split(rest[0])[3:6] == ["install", "torch==2.13.0", "-e"]
    assert demo.endswith("-m cp_data demo") and tests.endswith("-m pytest -q")
    assert ".[dev]" in tests and ".[hf,viz]" in demo
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == tests
    # Nothing in the README's shell blocks calls a bare `python` or `pip`.
    assert not [line for line in bash_lines(README) if re.match(r"\s*(python|pip)\s", line)]


def test_torch_is_pinned_only_in_the_commands():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [torch_dep] = [d for d in project["dependencies"] if d.startswith("torch")]
    assert "==" not in torch_dep and "<" in torch_dep and ">=" in torch_dep


def test_notebook_extra_installs_what_the_readme_runs():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    notebook = {re.split(r"[<>=\[]", d)[0] for d in extras["notebook"]}
    lines = bash_lines(section("### The notebook"))
    assert '-e ".[notebook]"' in lines[0]
    jupyter = [shlex.split(line)[1] for line in lines if line.startswith(".venv/bin/jupyter ")]
    assert sorted(jupyter) == ["nbconvert", "notebook"]
    assert set(jupyter) | {"ipykernel"} <= notebook  # the kernel the notebook runs on
    assert "cp-data" in notebook and {"hf", "viz"} <= set(re.findall(r"\w+", extras["notebook"][0])[2:])
    assert "notebooks/explore_shards.ipynb" in lines[1] and (ROOT / "notebooks/explore_shards.ipynb").exists()


def table_keys(title: str) -> set[str]:
    table = section(title).split("The **batch**")[1]
    rows = re.findall(r"^\| (.*?) \|", table, flags=re.M)[1:]  # the header row is not a key
    return {key for row in rows for key in re.findall(r"`(\w+)`", row)}


def test_readme_batch_table_lists_exactly_the_collated_keys():
    instance = dict(input_ids=torch.arange(12), doc_lens=torch.tensor([7, 3, 2]))
    produced = set()
    for kind in ("zig_zag", "llama3", "ulysses"):
        produced |= set(ContextParallelCollator(load_balancer=kind, cp_rank=0, cp_world_size=2)([instance] * 2))
    assert table_keys("### The batch contract") == produced


def test_docs_split_counts_what_the_readme_says():
    # S = 4, documents of 3, 3 and 9 tokens.
    bfd = PackingConfig(seq_len=4, algorithm="bfd").build().plan([3, 3, 9])
    long_doc = bfd.doc == 2
    assert bfd.start[long_doc].tolist() == [0, 4, 8] and bfd.length[long_doc].tolist() == [4, 4, 1]
    assert bfd.metrics()["docs_split"] == 1  # only the document longer than S
    concat = PackingConfig(seq_len=4, algorithm="concat").build().plan([3, 3, 9])
    assert concat.metrics()["docs_split"] == 2  # the second 3-token document crosses a row too


def test_batches_of_packed_instances_need_the_collator():
    rows = [dict(input_ids=torch.arange(8), doc_lens=torch.tensor(d)) for d in ([8], [3, 5])]
    with pytest.raises(RuntimeError):
        torch.utils.data.default_collate(rows)
    batch = ContextParallelCollator(load_balancer="zig_zag", cp_rank=0, cp_world_size=2)(rows)
    assert batch["cu_doc_lens"].tolist() == [0, 4, 6, 10]  # documents 8, 3, 5 padded to 8, 4, 8, halved


def test_drop_last_is_the_default_and_drops_what_the_readme_says():
    from cp_data.loader import ContextParallelLoaderConfig

    rows = [dict(input_ids=torch.arange(4) + 10 * i, doc_lens=torch.tensor([4])) for i in range(7)]
    counts = {}
    for drop_last in (True, False):
        overrides = {} if drop_last else {"drop_last": False}  # the default is what is tested
        config = ContextParallelLoaderConfig(batch_size=2, shuffle=False, **overrides)
        loader = config.build(rows, dp_rank=0, dp_world_size=2, cp_rank=0, cp_world_size=1)
        counts[drop_last] = [len(b["cu_doc_lens"]) - 1 for b in loader]
    # 7 samples over 2 dp ranks: 3 each (one dropped), one full batch (the short one dropped) ...
    assert counts[True] == [2]
    # ... or 4 each (one repeated from the start) in two full batches.
    assert counts[False] == [2, 2]
