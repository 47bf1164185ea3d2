"""Class words for stage 2's class prompts (`a photo of a woman`), from a CSV of `path,class_word` rows.

`path` is an image's key (its path relative to the images folder, e.g. `alice/01.jpg`) or a folder of keys
(`alice`); the most specific row wins. An optional header row `path,class_word` is skipped.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from pathlib import Path

MAX_CSV_BYTES = 64 * 2**20  # one row per photo or folder: a million rows fit


class ClassWords:
    def __init__(self, words: dict[str, str]) -> None:
        self.words = words

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> ClassWords:
        """Read the CSV; ValueError naming the file and line for a malformed row."""
        words: dict[str, str] = {}
        size = os.stat(path).st_size
        if size > MAX_CSV_BYTES:
            raise ValueError(f"{path}: {size:,} bytes, over the limit of {MAX_CSV_BYTES:,} for a class-word table")
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        rows = csv.reader(io.StringIO(text, newline=""))
        for line_no in itertools.count(1):
            try:
                row = next(rows, None)
            except csv.Error as e:  # an over-long field, a stray quote
                raise ValueError(f"{path} line {line_no}: not a CSV row ({e})") from None
            if row is None:
                break
            if any("\x00" in cell for cell in row):
                raise ValueError(f"{path} line {line_no}: holds a NUL byte")
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{path} line {line_no}: expected 'path,class_word', got {','.join(row)!r}")
            key, word = row[0].strip().strip("/").replace("\\", "/"), row[1].strip()
            if line_no == 1 and (key.lower(), word.lower()) == ("path", "class_word"):
                continue
            words[key] = word
        return cls(words)

    def __call__(self, key: str) -> str | None:
        """The word for `key`: its own row, else its nearest folder's, else None."""
        path = Path(key)
        for candidate in (key, *(p.as_posix() for p in path.parents if p.as_posix() != ".")):
            if candidate in self.words:
                return self.words[candidate]
        return None
