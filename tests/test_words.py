"""cli/words.py: counts in agreement with their nouns ("1 process", not "1 processes")."""

import pytest

from sdkd.cli.words import counted


@pytest.mark.parametrize("n, noun, said", [
    (1, "process", "1 process"), (2, "process", "2 processes"), (0, "image", "0 images"), (1, "image", "1 image"),
    (1200, "sample", "1,200 samples"), (3, "batch", "3 batches"), (2, "index", "2 indexes"),
    (2, "negative prompt", "2 negative prompts"),
])
def test_counted(n, noun, said):
    assert counted(n, noun) == said


def test_an_irregular_plural_is_given():
    assert counted(2, "child", "children") == "2 children" and counted(1, "child", "children") == "1 child"
