"""The README's commands work from the repository alone: a clean clone holds every dataset the tests
and benchmarks load (before, tests/conftest.py and bench/ read ../shared/datasets/, outside it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# where the tests and benchmarks of a checkout look for their datasets, as each module computes it
WHERE = """
import json, sys
sys.path.insert(0, ".")
import bench.bench_backup, bench.bench_scrape, tests.conftest
print(json.dumps([str(tests.conftest.DATASETS), str(bench.bench_backup.DATASET), str(bench.bench_scrape.DATASET)]))
"""


def loaded_datasets(tests: Path) -> set[str]:
    """The dataset names the tests load: load_dataset(..., "name") and the `dataset` parameters."""
    names: set[str] = set()
    for path in tests.rglob("test_*.py"):
        text = path.read_text()
        names |= set(re.findall(r'load_dataset\(\w+, \w+, "([^"]+)"\)', text))
        for group in re.findall(r'parametrize\("dataset", \[([^\]]*)\]', text):
            names |= set(re.findall(r'"([^"]+)"', group))
    return names


def test_a_clean_clone_holds_every_dataset_the_tests_and_benchmarks_load_with_its_licence(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True, capture_output=True)

    where = subprocess.run([sys.executable, "-c", WHERE], cwd=clone, capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    datasets, bench_backup, bench_scrape = (Path(p) for p in json.loads(where.stdout))
    names = loaded_datasets(clone / "tests")

    assert {"chinook.sql", "pagila-schema.sql"} <= names
    for path in [*(datasets / name for name in names), bench_backup, bench_scrape]:
        assert path.resolve().is_relative_to(clone.resolve()) and path.is_file(), path
        licence = path.with_name(path.name.split("-")[0].removesuffix(".sql") + ".LICENSE")
        assert licence.is_file(), licence
