"""The breakages issue 24's table lists (filled by the tests that catch them); see tests/mutation_table.py."""

from mutate import Mutation  # noqa: F401 - the records below are Mutation(...)

LISTED: list = []
