"""The test suite's own layout: pytest (rootdir-relative imports, tests/ dirs without __init__.py) collects one
module per basename, so two test files of the same name in tests/unit and tests/e2e break collection of the whole
suite; this says so before CI does."""

from collections import Counter

from conftest import ROOT


def test_every_test_file_has_a_basename_of_its_own():
    names = Counter(path.name for path in (ROOT / "tests").rglob("test_*.py"))
    assert not [name for name, count in names.items() if count > 1], "rename one of each pair"
