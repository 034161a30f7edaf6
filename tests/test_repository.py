"""The repository is self-contained: tests and the package never read files from outside it.

The real beamline files the tests use live in ``tests/data`` (see its README). A test that reads
``../shared/...`` (a folder beside the clone on some machines, absent on others) passes where
that folder happens to exist and fails everywhere else; ``.ci/run`` runs the suite in a copy of
the checkout with nothing beside it, and this test names the offending line before that.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py

from conftest import FIXTURES_DIR

ROOT = Path(__file__).resolve().parent.parent

# A path into a "shared" folder outside the repository, however it is spelled:
#   "../shared", '..\\shared', "shared/fixtures", Path(...).parent / "shared", os.path.join(.., "shared")
OUTSIDE_REFERENCE = re.compile(
    r"""\.\.[/\\]+shared\b"""          # ../shared
    r"""|\bshared[/\\]+fixtures\b"""    # shared/fixtures (relative to the repository's parent)
    r"""|(["'])shared\1"""              # a "shared" path component as a string literal
)


def _sources() -> list[Path]:
    files = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "dipid").rglob("*.py"))
    for folder in ("benchmarks", "examples"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def find_outside_references(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line of ``text`` that refers to a folder outside the repository."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if OUTSIDE_REFERENCE.search(line)]


def test_pattern_catches_the_ways_of_reaching_outside():
    bad = [
        'FIXTURES = Path(__file__).parent.parent.parent / "shared" / "fixtures"',
        "path = '../shared/fixtures/i16/1040323.nxs'",
        'os.path.join(root, "..", "shared")',
        "# see shared/fixtures/README.md",
        'p = "..\\\\shared\\\\x.nxs"',
    ]
    good = [
        'FIXTURES_DIR = Path(__file__).resolve().parent / "data"',
        "fig = make_subplots(rows=2, cols=1, shared_xaxes=True)",
        "# 8 px, 4 shared: IoU = 4/12",
        "(file handles are not shared across processes)",
    ]
    assert [line for line in bad if not find_outside_references(line)] == []
    assert [line for line in good if find_outside_references(line)] == []


def test_no_source_refers_outside_the_repository():
    sources = _sources()
    assert len(sources) > 20, f"expected the package and test sources under {ROOT}"
    found = [f"{path.relative_to(ROOT)}:{n}: {line}"
             for path in sources for n, line in find_outside_references(path.read_text(encoding="utf-8"))]
    assert found == [], "files outside the repository are referred to (put test data in tests/data):\n" + "\n".join(found)


def test_fixtures_are_inside_the_repository():
    fixtures = FIXTURES_DIR.resolve()
    assert fixtures == ROOT / "tests" / "data"
    for name in ("i16/1040323.nxs", "i16/1049598.nxs", "dipid_zooniverse_labels.csv", "README.md"):
        path = fixtures / name
        assert path.is_file(), f"{path} is missing; the test data belong to the repository (tests/data/README.md)"
        assert ROOT in path.resolve().parents, f"{path} is a link to outside the repository"
    for name in ("i16/1040323.nxs", "i16/1049598.nxs"):
        assert h5py.is_hdf5(fixtures / name), f"{fixtures / name} is not HDF5 (a Git LFS pointer or a text-converted copy?)"
    first_line = (fixtures / "dipid_zooniverse_labels.csv").read_bytes().split(b"\n", 1)[0]
    assert first_line.startswith(b"classification_id,"), first_line[:80]
