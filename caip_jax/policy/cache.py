"""Exact caches for caip-policy-eval: what is stored is found again only under the key of
exactly what made it, and is written whole or not at all.

A key is the SHA-256 of a canonical JSON description ("identity") of everything that shapes
the stored thing: for an encoder its spec, its checkpoint step (and the step's commit time),
its config and the contents of the files it is read from; for features that and the
demonstrations' identity; for a policy its whole training config with the SHA-256 of its rows.
Directories are named `<readable name>-<first 8 hex digits of the key>`: two encoders with the
same name (`/a/run`, `/b/run`) get two directories, and a workdir trained further gets a new one,
so a stale or foreign entry is never found, let alone reused. Each entry also stores its full
identity, checked when read (a prefix collision, or a file from elsewhere, is recomputed).

Files are written through caip_jax.storage (beside, then renamed), so a process killed
mid-write leaves either the old entry or none: never half an .npz.
"""
import hashlib
import json
import logging
import os
import re

import numpy as np

from caip_jax import storage

KEY_ENTRY = "__cache_identity__"  # the identity stored inside a cached .npz
WHOLE_FILE_LIMIT = 64 << 20  # files above this are hashed by size, mtime and their first and last MiB


def key(identity) -> str:
    """The SHA-256 (hex) of `identity`'s canonical JSON."""
    return hashlib.sha256(canonical(identity).encode()).hexdigest()


def canonical(identity) -> str:
    return json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)


def slug(name: str) -> str:
    """A readable file name of `name`: runs of other characters than [A-Za-z0-9_.] become '-'."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-") or "x"


def directory_name(name: str, identity) -> str:
    """`<slug(name)>-<8 hex digits of key(identity)>`."""
    return f"{slug(name)}-{key(identity)[:8]}"


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str) -> str:
    """SHA-256 of a local file's content; above WHOLE_FILE_LIMIT (videos of a big robot dataset,
    multi-GB weights) of its size, modification time and first and last MiB instead. Memoised
    per (path, size, mtime) within the process."""
    stat = os.stat(path)
    memo = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if memo in _DIGESTS:
        return _DIGESTS[memo]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if stat.st_size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            digest.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read(1 << 20))
    _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def tree_digest(path: str, skip: tuple[str, ...] = ()) -> str:
    """SHA-256 over every file under the local path `path` (a file or a directory): relative
    names and `file_digest`s, in sorted order. Names starting with one of `skip` are left out."""
    if os.path.isfile(path):
        return file_digest(path)
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            relative = os.path.relpath(os.path.join(root, name), path)
            if not relative.startswith(skip):
                entries.append((relative, file_digest(os.path.join(root, name))))
    return key(entries)


def read_npz(path: str, identity) -> dict[str, np.ndarray] | None:
    """The arrays of the .npz `path` if it exists and was written for `identity`; else None
    (a foreign, stale or unreadable file is logged and left to be written again)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as stored:
            if KEY_ENTRY not in stored.files or str(stored[KEY_ENTRY]) != canonical(identity):
                logging.warning("%s was made from something else: computing it again", path)
                return None
            return {name: stored[name] for name in stored.files if name != KEY_ENTRY}
    except Exception as error:  # noqa: BLE001 -- a damaged cache entry is recomputed, whatever broke it
        logging.warning("%s cannot be read (%s): computing it again", path, error)
        return None


def write_npz(path: str, identity, arrays: dict[str, np.ndarray]) -> None:
    """`arrays` and `identity` to the .npz `path`, whole or not at all."""
    storage.write_encoded(path, lambda f: np.savez(f, **{KEY_ENTRY: np.array(canonical(identity))}, **arrays))


def read_json(path: str, identity) -> dict | None:
    """The JSON entry `path` if it exists and was written for `identity` (its "identity" field),
    else None."""
    if not os.path.exists(path):
        return None
    try:
        stored = storage.read_json(path)
    except (OSError, ValueError) as error:
        logging.warning("%s cannot be read (%s): computing it again", path, error)
        return None
    if canonical(stored.get("identity")) != canonical(identity):
        logging.warning("%s was made from something else: computing it again", path)
        return None
    return stored


def write_json(path: str, identity, content: dict) -> None:
    storage.write_json(path, dict(content, identity=json.loads(canonical(identity))))


def distinct_names(names: list[str], paths: list[str | None]) -> list[str]:
    """Display names, made distinct: a name shared by several entries gets the shortest tail of
    its path that tells it apart (`caip:run` -> `caip:a/run`, `caip:b/run`); entries still equal
    (or without a path) are numbered, `name#2`."""
    out = list(names)
    for name in set(names):
        where = [i for i, n in enumerate(names) if n == name]
        if len(where) < 2:
            continue
        parts = {i: _parts(paths[i]) for i in where}
        prefix = name.split(":", 1)[0] + ":" if ":" in name else ""
        for depth in range(2, 1 + max(len(p) for p in parts.values())):
            tails = {i: "/".join(parts[i][-depth:]) for i in where}
            if all(parts[i] for i in where) and len(set(tails.values())) == len(where):
                for i in where:
                    out[i] = prefix + tails[i]
                break
    seen: dict[str, int] = {}
    for i, name in enumerate(out):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            out[i] = f"{name}#{seen[name]}"
    return out


def _parts(path: str | None) -> list[str]:
    """The components of a local path (made absolute) or of a URL's path, [] for None."""
    if not path:
        return []
    if storage.is_remote(path):
        return [p for p in path.split("://", 1)[1].split("/") if p]
    return os.path.normpath(os.path.abspath(path)).split(os.sep)
