"""Input file lists: globs, `{000..123}` ranges, directories (their files) and comma-separated
lists, local or remote (etils epath: gs://, s3://, ...; a `file://` URI is a local path)."""
from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence

from etils import epath


def local_or_uri(path: str) -> str:
    """A `file://` URI as the local path it names (etils epath knows only remote schemes); a
    local path with `~` expanded; other URIs unchanged."""
    if path.startswith("file://"):
        return path[len("file://"):]
    return path if "://" in path else os.path.expanduser(path)


def _glob(pattern: str) -> list[str]:
    if "://" not in pattern:
        return sorted(glob.glob(pattern))
    # epath globs below a folder: split off the first path component holding a wildcard.
    parts = pattern.split("/")
    first = next((i for i, part in enumerate(parts) if glob.has_magic(part)), None)
    if first is None:
        return [pattern] if epath.Path(pattern).exists() else []
    root = epath.Path("/".join(parts[:first]))
    return sorted(os.fspath(p) for p in root.glob("/".join(parts[first:])))


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Globs, `{0000..0099}` ranges and comma-separated lists -> sorted existing files."""
    items = paths.split(",") if isinstance(paths, str) else list(paths)
    patterns = [p.strip() for p in items if p and p.strip()]
    if not patterns:
        raise ValueError("no paths configured for this source")
    out: list[str] = []
    for pattern in patterns:
        for expanded in _expand_ranges(local_or_uri(pattern)):
            matches = _glob(expanded)
            if not matches:
                raise FileNotFoundError(f"no file matches {expanded!r}")
            for match in matches:
                out += _directory_files(match) if epath.Path(match).is_dir() else [match]
    return out


def _directory_files(directory: str) -> list[str]:
    """The visible regular files of a directory given as a path (not recursive)."""
    try:
        entries = list(epath.Path(directory).iterdir())
    except PermissionError as e:
        raise PermissionError(f"cannot read input directory {directory}: permission denied") from e
    files = sorted(os.fspath(p) for p in entries if not p.name.startswith(".") and p.is_file())
    if not files:
        raise FileNotFoundError(f"no input files in {directory}")
    return files


def _expand_ranges(pattern: str) -> list[str]:
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    lo, hi, width = int(match.group(1)), int(match.group(2)), len(match.group(1))
    return [expanded for i in range(lo, hi + 1) for expanded in _expand_ranges(
        pattern[:match.start()] + str(i).zfill(width) + pattern[match.end():])]
