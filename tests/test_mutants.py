"""Every mutant of ``make mutants`` still applies: a change to the runtime that removes a mutant's text fails here,
in the suite every commit runs, not after an hour of CI's mutant stage (0.3.3's cost lines did that once)."""

import os

import pytest

from tests.mutants import MUTANTS, ROOT, stale


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutation_applies_once_and_names_tests_that_exist(mutant):
    with open(os.path.join(ROOT, mutant.path)) as f:
        text = f.read()
    assert stale(mutant, text) is None, f"{mutant.name}: {stale(mutant, text)}"
    assert mutant.old != mutant.new
    for test in mutant.tests:
        path, _, name = test.partition("::")
        assert os.path.isfile(os.path.join(ROOT, path)), f"{mutant.name}: no {path}"
        if name:
            function = name.split("::")[-1].split("[")[0]
            with open(os.path.join(ROOT, path)) as f:
                assert f"def {function}(" in f.read(), f"{mutant.name}: no test {name} in {path}"


def test_mutant_names_are_unique():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))
