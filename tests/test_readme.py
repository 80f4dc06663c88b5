"""The README stays true to the code: its Python example runs as printed, and every file it names exists."""
import re
from pathlib import Path

import jax
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_trains_one_step():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, f"expected the one library example in README.md, found {len(blocks)} python blocks"
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert 0.0 <= float(scope["metrics"]["accuracy"]) <= 1.0
    assert int(scope["state"][0].count) == 1, "the example's step did not update Adam's state"
    leaves = jax.tree_util.tree_leaves(scope["params"])
    assert leaves and all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)


def test_readme_names_only_files_that_exist():
    named = set(re.findall(r"\b(?:experiments|benchmarks|bridges|fsl_jax|tests)/[\w/.-]*\w\.(?:py|yaml|md)\b", README.read_text()))
    assert named, "the pattern found no file names in README.md"
    missing = sorted(path for path in named if not (README.parent / path).exists())
    assert not missing, f"README.md names files that do not exist: {missing}"


def test_readme_tables_are_the_experiment_scripts_output():
    """Each ``<!-- results:NAME -->`` block holds experiments/results/NAME.md as written (update_readme.py)."""
    blocks = re.findall(r"<!-- results:(\w+) -->\n(.*?)<!-- /results:\1 -->", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no results blocks"
    results = README.parent / "experiments" / "results"
    stale = [name for name, text in blocks if not (results / f"{name}.md").is_file() or (results / f"{name}.md").read_text() != text]
    assert not stale, f"README.md's tables differ from experiments/results (run experiments/update_readme.py): {stale}"
