"""Real English sentences that ship with Python: docstrings of standard-library modules.

They calibrate and evaluate sentence encoders offline. Docstrings are split into
sentences; code-like fragments (doctest lines, signatures, very short or very
long pieces) are dropped, duplicates removed and the rest shuffled with a seeded
generator, so a seed always yields the same sentences on one Python version.

Example:
    >>> sentences = real_sentences(8, seed=0)
    >>> len(sentences), all(s[-1] in ".!?" for s in sentences)
    (8, True)
"""

from __future__ import annotations

import importlib
import inspect
import re

import numpy as np

__all__ = ["real_sentences"]

# Standard-library modules with prose docstrings (always installed with Python).
_MODULES = ("argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
            "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum",
            "fractions", "functools", "gzip", "hashlib", "heapq", "http.client", "inspect",
            "ipaddress", "itertools", "json", "logging", "mailbox", "pathlib", "pickle",
            "pprint", "queue", "random", "re", "shutil", "socket", "sqlite3", "statistics",
            "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
            "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile")

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE = re.compile(r">>>|\.\.\.|[{}\[\]=_<>|`\\]|\(\w*\)|\w\.\w+\(|::|\s{2,}")


def _docstrings() -> list[str]:
    texts = []
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stripped-down Python may lack a module or two
            continue
        texts.append(inspect.getdoc(module) or "")
        for _, member in sorted(vars(module).items()):
            if (inspect.isclass(member) or inspect.isfunction(member)) and \
                    getattr(member, "__module__", None) == module.__name__:
                texts.append(inspect.getdoc(member) or "")
    return texts


def real_sentences(num: int, seed: int = 0, min_chars: int = 40,
                   max_chars: int = 240) -> list[str]:
    """``num`` distinct prose sentences from standard-library docstrings.

    Raises:
        ValueError: fewer than ``num`` sentences pass the filters.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    found: dict[str, None] = {}
    for text in _docstrings():
        for paragraph in text.split("\n\n"):
            flat = " ".join(paragraph.split())
            for sentence in _SPLIT.split(flat):
                if (min_chars <= len(sentence) <= max_chars and sentence[-1] in ".!?"
                        and sentence[0].isupper() and not _CODE.search(sentence)
                        and len(sentence.split()) >= 6):
                    found[sentence] = None
    pool = sorted(found)
    if len(pool) < num:
        raise ValueError(
            f"only {len(pool)} sentences found in standard-library docstrings, {num} asked; "
            "ask for fewer or relax min_chars/max_chars"
        )
    order = np.random.default_rng(seed).permutation(len(pool))[:num]
    return [pool[i] for i in order]
