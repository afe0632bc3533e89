"""`load_yaml`: safe_load's values, without aliases or repeated keys, in time linear in the keys."""

import time

import pytest

from bema_offline.errors import DataError, UsageError
from bema_offline.safe_yaml import load_yaml


def test_plain_documents_read_as_safe_load_reads_them():
    assert load_yaml("a: 1\nb: [x, 2.5]\nwindow: 400:800\n", what="f") == {"a": 1, "b": ["x", 2.5], "window": "400:800"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("a: &x [1]\nb: *x\n", "line 2 uses a YAML alias"),
        ("a: 1\nb: 2\na: 3\n", "key 'a' is given twice"),
        ("1: a\n1.0: b\n", "key 1.0 is given twice"),  # the same key to Python
    ],
)
def test_aliases_and_repeated_keys_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        load_yaml(text, what="--sweep s.yaml", refuse=UsageError)


def test_a_mapping_of_many_keys_is_checked_in_linear_time():
    keys = 100_000
    text = "".join(f"k{i}: {i}\n" for i in range(keys)) + "k7: again\n"
    started = time.monotonic()
    with pytest.raises(DataError, match="key 'k7' is given twice"):
        load_yaml(text, what="README.md")
    assert time.monotonic() - started < 30  # quadratic: 5·10⁹ comparisons, minutes
