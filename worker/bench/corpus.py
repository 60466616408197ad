"""English text of varied length, offline: paragraphs of the Python standard library's docstrings.

Every Python installation carries it, so the benchmark and the tests need no download, and it
is the same whatever else the process imported (only what each module defines itself). A
paragraph is one docstring block (blank-line separated), whitespace collapsed; lengths run from
a few words to several hundred tokens, the mix that packing by length is for.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings
from types import ModuleType

__all__ = ["MODULES", "paragraphs"]

MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "email", "functools", "heapq", "http.client", "io", "itertools",
    "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket",
    "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
    "typing", "unittest", "urllib.parse", "uuid", "zipfile", "calendar", "configparser",
    "difflib", "enum", "fractions", "ftplib", "gettext", "imaplib", "ipaddress", "mailbox",
    "optparse", "pprint", "queue", "sched", "shlex", "smtplib", "tempfile", "traceback",
)  # fmt: skip
"""Modules whose docstrings make the corpus (not ``inspect``: libraries patch its functions)."""

_WORDS = re.compile(r"[A-Za-z]{2,}")


def _defined_in(member: object, module: ModuleType) -> bool:
    """A class the module defines, or a function whose code lives in the module's file."""
    if inspect.isclass(member):
        return member.__module__ == module.__name__
    return inspect.isfunction(member) and member.__code__.co_filename == module.__file__


def _docstrings() -> list[str]:
    found = []
    with warnings.catch_warnings():  # typing's deprecated submodules warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in MODULES:
            module = importlib.import_module(name)
            found.append(inspect.getdoc(module) or "")
            for _, member in sorted(vars(module).items()):
                # Only what the module itself defines: a library imported later may replace a
                # stdlib function (torch patches inspect's), which would change the corpus.
                if _defined_in(member, module):
                    found.append(inspect.getdoc(member) or "")
    return found


def paragraphs(count: int, *, seed: int = 0, min_words: int = 4, max_words: int = 220) -> list[str]:
    """``count`` distinct paragraphs of prose (mostly words), shuffled by ``seed``."""
    seen: set[str] = set()
    for doc in _docstrings():
        for block in re.split(r"\n\s*\n", doc):
            text = " ".join(block.split())
            words = text.split()
            if not min_words <= len(words) <= max_words:
                continue
            if len(_WORDS.findall(text)) < 0.6 * len(words):  # code samples, tables
                continue
            seen.add(text)
    ordered = sorted(seen)
    random.Random(seed).shuffle(ordered)  # noqa: S311 - a reproducible sample, not a secret
    if len(ordered) < count:
        raise ValueError(f"the corpus has {len(ordered)} paragraphs; {count} were asked for")
    return ordered[:count]
