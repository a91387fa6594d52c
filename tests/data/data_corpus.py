"""Small deterministic corpora written into a test's temp dir."""

import json
import os
import random

ALPHABET = "abcdefgh ijk\n\tXYZ_=():é漢🙂"


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def write_files(root, num_docs: int = 24, seed: int = 0) -> list[str]:
    """``num_docs`` text files with lengths from 0 to a few thousand characters."""
    rng = random.Random(seed)
    lengths = [0, 1, 2, 3000] + [rng.randint(5, 1200) for _ in range(num_docs - 4)]
    paths = []
    for i, n in enumerate(lengths):
        path = os.path.join(root, f"doc{i:03d}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_text(rng, n))
        paths.append(path)
    return paths


def write_jsonl(root, num_docs: int = 30, seed: int = 1, field: str = "text") -> str:
    rng = random.Random(seed)
    path = os.path.join(root, "docs.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_docs):
            f.write(json.dumps({"id": i, field: _text(rng, rng.randint(1, 400))}) + "\n")
            if i % 7 == 0:
                f.write("\n")  # blank lines are skipped
    return path


CODE = '''import os


class Foo(object):
    """A docstring with  two spaces."""

    def bar(self, x: int = 12345) -> int:
\t\treturn x  *  2  # tabs and runs of spaces


def main():
    for i in range(10):
        print(f"{i:>4d}\\t{i ** 2}")
'''
