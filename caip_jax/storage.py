"""Files wherever they lie: a local path and object storage (gs://, or any fsspec scheme) behave
alike through this one module, which every file the project reads or writes goes through.

Object storage differs from a disk in ways that decide the shape of the code:
- An object is written whole or not at all, and cannot be appended to: `write_bytes` is atomic
  on both (a local file is written beside and renamed), and a growing file (`metrics.jsonl`) is
  kept locally and uploaded whole (`GrowingFile`).
- Some writers only write local files (array_record's, safetensors'): they write into
  `staged_directory`, which uploads the files whole when the block ends; readers of local files
  only (numpy's npz, transformers) read a `local_copy`.
- There are no folders: nothing is made before a write, and a "directory" is a name prefix.
- A request can fail for a while and then succeed. The clients retry those themselves (gcsfs six
  times with backoff, about 30 s; tensorstore likewise); `is_transient` tells such a failure from
  one that will not pass (absent, forbidden, undecodable), so callers never mistake a passing
  outage for lost data.
- A wrong bucket, missing credentials or a read-only bucket must stop a job at its start, by name,
  not after an hour or a 16-minute retry loop in a C++ client: `check_access`.
"""
import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator

import fsspec
from etils import epath

# fsspec file systems (gcsfs) cache directory listings for the life of a process: a checkpoint
# listing would then miss the steps that tensorstore, or another host, wrote since. Listings are
# read anew each time (what lists here is rare: steps at restore, shards at open).
fsspec.config.conf.setdefault("gcs", {}).update(use_listings_cache=False)

# The substrings by which tensorstore (orbax's arrays) and the C++ clients report a failure that
# may pass: absl status codes, and HTTP statuses a retry can cure.
_TRANSIENT_WORDS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "Connection reset",
                    "Connection refused", "timed out", "HTTP 429", "HTTP 500", "HTTP 502", "HTTP 503", "HTTP 504")


class StorageError(OSError):
    """A path that cannot be used as asked: its message is one line naming the path and the fix."""


def is_remote(path: str) -> bool:
    """True for object storage and other fsspec URLs (gs://B/x), False for local paths."""
    return "://" in str(path) and not str(path).startswith("file://")


def join(path: str, *names: str) -> str:
    """`path`/name/... as a string: '/'-joined for a URL (a pathlib join would turn 'gs://b' into
    'gs:/b'), os.path.join for a local path."""
    return "/".join([str(path).rstrip("/"), *names]) if is_remote(path) else os.path.join(path, *names)


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def read_bytes(path: str) -> bytes:
    """The whole file; FileNotFoundError naming `path` if it is absent."""
    try:
        return epath.Path(path).read_bytes()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path} does not exist") from error


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def read_json(path: str):
    return json.loads(read_bytes(path))


def write_bytes(path: str, data: bytes) -> None:
    """Writes `path` whole or not at all: an object upload is all-or-nothing, and a local file is
    written beside and renamed, so a reader (or a process killed mid-write) never leaves half a
    file. Local parent directories are made; object storage has none to make."""
    if is_remote(path):
        epath.Path(path).write_bytes(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, content) -> None:
    write_text(path, json.dumps(content, indent=1, sort_keys=True))


def write_encoded(path: str, save) -> None:
    """Writes what `save(file)` writes into a binary file object (PIL's `Image.save`, matplotlib's
    `savefig`, `np.savez`): encoded in memory, then written whole."""
    buffer = io.BytesIO()
    save(buffer)
    write_bytes(path, buffer.getvalue())


def makedirs(path: str) -> None:
    """A local directory and its parents; nothing on object storage (no folders there)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def upload_directory(local: str, target: str, last: tuple[str, ...] = ()) -> list[str]:
    """Copies every file under the local directory `local` to `target` (same relative names),
    each whole and streamed from disk, and returns the target paths. Files named in `last` go
    after the others: a file that marks a set complete (summary.json) appears only once the rest
    is there."""
    files = sorted(os.path.relpath(os.path.join(root, name), local) for root, _, names in os.walk(local) for name in names)
    files.sort(key=lambda name: name in last)
    fs = _filesystem(target) if is_remote(target) else None
    written = []
    for relative in files:
        source, destination = os.path.join(local, relative), join(target, *relative.split(os.sep))
        if fs is not None:
            fs.put_file(source, destination)
        else:
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            shutil.copyfile(source, destination)
        written.append(destination)
    return written


@contextlib.contextmanager
def staged_directory(path: str, last: tuple[str, ...] = ()) -> Iterator[str]:
    """A local directory to write `path`'s files into, for writers that only write local files.
    For a local `path` it is `path` itself (made). For a remote one it is a fresh temporary
    directory whose files are uploaded to `path` when the block ends without an error, then
    removed (`last`: see `upload_directory`); after an error nothing is uploaded, so no partial
    set appears there."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    scratch = tempfile.mkdtemp(prefix="caip-staged-")
    try:
        yield scratch
        upload_directory(scratch, path, last)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class GrowingFile:
    """A text file that grows by whole lines (metrics.jsonl). A local file is appended to and
    flushed at each line. Object storage cannot append: the file is kept in a local copy (begun
    from what `path` already holds, as a resumed run continues its log) and uploaded whole at
    most every `upload_every` seconds, and at `close`, which a run reaches on SIGTERM too."""

    def __init__(self, path: str, upload_every: float = 30.0):
        self.path, self._upload_every, self._uploaded = path, upload_every, time.monotonic()
        self._scratch = None
        if is_remote(path):
            self._scratch = tempfile.mkdtemp(prefix="caip-growing-")
            local = os.path.join(self._scratch, os.path.basename(path))
            with open(local, "wb") as f:
                f.write(read_bytes(path) if exists(path) else b"")
        else:
            local = path
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._local = local
        self._file = open(local, "a")

    def write_line(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()
        if self._scratch and time.monotonic() - self._uploaded >= self._upload_every:
            self.upload()

    def upload(self) -> None:
        """The whole file to `path` now (object storage; nothing to do for a local file)."""
        if self._scratch:
            _filesystem(self.path).put_file(self._local, self.path)
            self._uploaded = time.monotonic()

    def close(self) -> None:
        self._file.close()
        if self._scratch:
            self.upload()
            shutil.rmtree(self._scratch, ignore_errors=True)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding `path`'s file or directory, for readers of local files only (numpy's
    npz, safetensors, transformers' configs): `path` itself if it is local, else a temporary
    download of it, removed when the block ends."""
    if not is_remote(path):
        yield path
        return
    scratch = tempfile.mkdtemp(prefix="caip-download-")
    try:
        local = os.path.join(scratch, os.path.basename(str(path).rstrip("/")))
        _filesystem(path).get(str(path).rstrip("/"), local, recursive=True)
        yield local
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def move(source: str, target: str) -> None:
    """Moves a file or a directory tree. On object storage a "directory" moves object by object
    (copy, then delete the original): no object is lost if the move is cut short."""
    if not is_remote(source):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        os.replace(source, target)
        return
    fs = _filesystem(source)
    fs.copy(source.rstrip("/"), target.rstrip("/"), recursive=True)
    fs.rm(source.rstrip("/"), recursive=True)


def _filesystem(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)[0]


def is_transient(error: BaseException) -> bool:
    """True for a failure that may pass if the request is repeated later (a dropped connection,
    a timeout, a 5xx or 429 from the store), False for one that will not (absent, forbidden, not
    decodable, out of memory)."""
    if isinstance(error, (FileNotFoundError, PermissionError, MemoryError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    try:
        from gcsfs.retry import is_retriable
    except ImportError:  # gcsfs not installed: only the message can tell
        is_retriable = lambda e: False
    if is_retriable(error):
        return True
    return any(word in str(error) for word in _TRANSIENT_WORDS)


RETRY_FIRST_WAIT_S = 2.0  # then 4 and 8: on top of the clients' own retries, a minute-long outage


def retry(function, what: str, attempts: int = 4):
    """`function()`, repeated after a transient failure (see `is_transient`) with doubling waits;
    the last failure, or any other, is raised. `what` names the operation in the log."""
    for attempt in range(attempts):
        try:
            return function()
        except Exception as error:
            if attempt == attempts - 1 or not is_transient(error):
                raise
            wait = RETRY_FIRST_WAIT_S * 2**attempt
            logging.warning("%s failed (%s: %s); a transient storage error? retrying in %.0f s (%d of %d)",
                            what, type(error).__name__, str(error).splitlines()[0][:200], wait, attempt + 1, attempts - 1)
            time.sleep(wait)


# -- fail fast ---------------------------------------------------------------------------------


def check_access(path: str, write: bool = False, what: str = "") -> None:
    """Stops at once, with a StorageError naming `path` (`what`: the flag that gave it) and the
    fix, if `path` cannot be used: for a remote path, no credentials, a bucket that does not
    exist, no permission; to read, `path` must exist; to write, a probe object is written there
    and deleted. A local path to read must exist, one to write lie under a writable directory."""
    label = f"{what}={path}" if what else path
    if not is_remote(path):
        if not write and not os.path.exists(path):
            raise StorageError(f"{label} does not exist")
        existing = os.path.abspath(path)
        while not os.path.exists(existing):  # what a write would create its directories in
            existing = os.path.dirname(existing)
        if write and not os.access(existing, os.W_OK):
            raise StorageError(f"{label} cannot be written: {existing} is not writable by this user")
        return
    scheme, rest = str(path).split("://", 1)
    bucket = rest.split("/", 1)[0]
    if scheme in ("gs", "gcs"):
        _check_gcs_credentials(label)
    fs = _filesystem(path)
    no_bucket = StorageError(f"{label}: the bucket {scheme}://{bucket} does not exist (a typo?): check the name, or "
                             f"create it (gcloud storage buckets create {scheme}://{bucket})")
    # Objects are tried, never the bucket's metadata, which an account allowed to use the objects
    # (roles/storage.objectUser) may not read.
    try:
        if write:
            probe = join(path, f".caip-write-check-{uuid.uuid4().hex[:12]}")
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
            return
        if fs.exists(str(path).rstrip("/")):
            return
    except FileNotFoundError as error:  # an upload into a bucket that is not there
        raise no_bucket from error
    except Exception as error:  # noqa: BLE001 -- any failure here means the job cannot start
        if write:
            raise StorageError(f"{label} cannot be written ({_first_line(error)}): the account needs permission to "
                               f"create and delete objects there (roles/storage.objectUser on {scheme}://{bucket})") from error
        raise StorageError(f"{label} cannot be read ({_first_line(error)}): {_credentials_fix(scheme)}, with "
                           f"permission to read objects there (roles/storage.objectViewer on {scheme}://{bucket})") from error
    raise no_bucket if not fs.exists(f"{scheme}://{bucket}") else StorageError(f"{label} does not exist")


def _check_gcs_credentials(label: str) -> None:
    """Application Default Credentials must be found, as every GCS client (gcsfs, tensorstore,
    array_record's C++ reader) looks them up; array_record's reader would otherwise retry for
    about 16 minutes. An emulator (STORAGE_EMULATOR_HOST) needs none."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    import google.auth
    import google.auth.exceptions

    try:
        google.auth.default()
    except google.auth.exceptions.GoogleAuthError as error:
        raise StorageError(f"{label}: no Google Cloud credentials found: {_credentials_fix('gs')}") from error


def _credentials_fix(scheme: str) -> str:
    if scheme not in ("gs", "gcs"):
        return "check the path and the credentials of its file system"
    return ("run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service "
            "account's key file (a TPU or GCE VM uses its own service account)")


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
