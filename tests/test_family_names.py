"""Only the families module names a pipeline's text encoders and tokenizers (train/models/families.py): outside
it no code in train/, data/ or eval/ says `text_encoder` or `tokenizer` (whole words) - no identifier,
attribute, keyword argument or name-like string (one without spaces: a key, a subfolder, a file name).
Prose in comments, docstrings and messages may speak of text encoders and tokenizers; config keys such as
`lora.train_text_encoder` are other words."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

WORDS = re.compile(r"\b(text_encoder|tokenizer)\b")
FAMILIES = ROOT / "train" / "models" / "families.py"
FILES = sorted(p for package in ("train", "data", "eval") for p in (ROOT / package).rglob("*.py") if p != FAMILIES)


def names_in(source: str) -> list[tuple[int, str]]:
    """(line, text) of every name in `source` that is one of `WORDS`: identifiers, attributes, keyword
    arguments, parameters, imported names, and strings without whitespace."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            texts = [node.id]
        elif isinstance(node, ast.Attribute):
            texts = [node.attr]
        elif isinstance(node, ast.keyword):
            texts = [node.arg or ""]
        elif isinstance(node, ast.arg):
            texts = [node.arg]
        elif isinstance(node, ast.alias):
            texts = [node.name, node.asname or ""]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            texts = [node.name]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and not re.search(r"\s", node.value):
            texts = [node.value]
        else:
            continue
        hits += [(getattr(node, "lineno", 0), text) for text in texts if WORDS.search(text)]
    return hits


def test_the_checker_finds_names_and_passes_prose_over():
    code = '''
"""A docstring about the tokenizer and the text_encoder."""
x = parts.text_encoder  # the text_encoder
def f(tokenizer): return g(text_encoder=1, name="tokenizer", key="text_encoder.", file="tokenizer.json")
message = f"the tokenizer of {x} failed"
train_text_encoder = cfg.lora.train_text_encoder
'''
    found = sorted(text for _, text in names_in(code))
    assert found == sorted(["text_encoder", "tokenizer", "text_encoder", "tokenizer", "text_encoder.",
                            "tokenizer.json"])


def test_no_code_outside_the_families_module_names_text_encoders_or_tokenizers():
    hits = [f"{path.relative_to(ROOT)}:{line}: {text}" for path in FILES
            for line, text in names_in(path.read_text(encoding="utf-8"))]
    assert not hits, "component names outside train/models/families.py (ask the family):\n" + "\n".join(hits)
