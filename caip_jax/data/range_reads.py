"""Record shards on gs:// read one exact byte range a record, over connections kept open.

array_record reads gs:// itself, but asks for each record with an open-ended range
(`Range: bytes=OFFSET-`), takes its record from the front of a transfer of the rest of the object
and drops the connection: a new connection a record, and several times the record's bytes sent
(benchmarks/object_store.py measures both). Here each shard's index is read once per process
(`record_ranges.read_ranges`: its tail, and its footer if that lies further back), then record i
is one GET of exactly its bytes, of the object generation whose index was read, on a connection
its thread keeps. A batch's records are fetched concurrently.

Chunk hashes are not checked on this path (array_record's reader checks them): GCS checks objects
itself (CRC32C on upload and at rest, TLS in transit), and a record that does not decode is still
skipped and logged by the pipeline. A shard in another layout (several records a chunk, or
compressed) is read by array_record's reader instead.
"""
import concurrent.futures
import http.client
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Sequence

import numpy as np
from array_record.python import array_record_module

from caip_jax.data import record_ranges

PUBLIC_ENDPOINT = "https://storage.googleapis.com"
READ_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
FETCH_THREADS = 32  # requests in flight per process: a batch's records at once
ATTEMPTS, FIRST_WAIT_S = 6, 0.5  # waits 0.5, 1, 2, 4, 8 s: a 15 s outage passes, a longer one is raised
_RETRY_STATUSES = (408, 429, 500, 502, 503, 504)


def endpoint_from_environment() -> str:
    """The GCS endpoint every Python client uses: STORAGE_EMULATOR_HOST (an emulator) or GCS's."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if not emulator:
        return PUBLIC_ENDPOINT
    return emulator if "://" in emulator else f"http://{emulator}"


class TransientReadError(ConnectionError):
    """A request that kept failing in a way that may pass (`storage.is_transient` is True)."""


class _Client:
    """GETs on objects of one endpoint, from any thread: a connection per thread, kept open;
    an OAuth token shared and refreshed before it expires (none for an emulator)."""

    def __init__(self, endpoint: str):
        parts = urllib.parse.urlsplit(endpoint)
        self._https, self._host = parts.scheme == "https", parts.netloc
        self._credentials, self._lock, self._local = None, threading.Lock(), threading.local()
        if endpoint == PUBLIC_ENDPOINT:
            import google.auth

            self._credentials, _ = google.auth.default(scopes=[READ_SCOPE])

    def get(self, url: str, query: dict, byte_range: tuple[int, int] | None = None) -> tuple[bytes, dict]:
        """(body, lower-cased headers) of GET `url` (gs://BUCKET/NAME), of bytes [begin, end) if
        given. Retried with doubling waits on a dropped connection, 408, 429 and 5xx; 404 is
        FileNotFoundError; any other status an OSError; both naming `url`."""
        bucket, name = url.removeprefix("gs://").split("/", 1)
        path = f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?{urllib.parse.urlencode(query)}"
        headers = self._auth()
        if byte_range is not None:
            headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
        for attempt in range(ATTEMPTS):
            try:
                connection = self._connection()
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                body = response.read()
                failure = None if response.status < 400 else f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as error:  # reset, refused, timed out, cut short
                self._local.connection = None
                failure = f"{type(error).__name__}: {error}"
                response = None
            if failure is None:
                if byte_range is not None and len(body) != byte_range[1] - byte_range[0]:  # a server that ignored Range
                    raise OSError(f"GET {url} bytes {headers['Range'][6:]} returned {len(body)} bytes")
                return body, {k.lower(): v for k, v in response.getheaders()}
            if response is not None and response.status == 404:
                raise FileNotFoundError(f"{url} (generation {query.get('generation', 'latest')}) is not there: HTTP 404")
            if response is not None and response.status not in _RETRY_STATUSES:
                raise OSError(f"GET {url} failed: {failure} {body[:200]!r}")
            if attempt < ATTEMPTS - 1:
                time.sleep(FIRST_WAIT_S * 2**attempt)
        raise TransientReadError(f"GET {url} failed {ATTEMPTS} times over {FIRST_WAIT_S * (2**(ATTEMPTS - 1) - 1):.0f} s: {failure}")

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = self._local.connection = kind(self._host, timeout=60)
        return connection

    def _auth(self) -> dict:
        if self._credentials is None:
            return {}
        with self._lock:
            if not self._credentials.valid:
                import google.auth.transport.requests

                self._credentials.refresh(google.auth.transport.requests.Request())
            return {"Authorization": f"Bearer {self._credentials.token}"}


class _Shard:
    """One shard's record ranges and the generation they were read from, or, for a shard in
    another layout, array_record's reader of it."""

    def __init__(self, client: _Client, url: str, count: int):
        meta, _ = client.get(url, {})
        meta = json.loads(meta)
        self.url, self.query = url, {"alt": "media", "generation": meta["generation"]}
        read = lambda offset, length: client.get(url, self.query, (offset, offset + length))[0]
        try:
            self.ranges, self.reader = record_ranges.read_ranges(read, int(meta["size"])), None
            found = len(self.ranges.begins)
        except record_ranges.RecordLayoutError:
            self.ranges, self.reader = None, array_record_module.ArrayRecordReader(url, "readahead_buffer_size:0")
            found = self.reader.num_records()
        if found != count:  # absent as it was opened: what a deleted shard is, see pipeline._unreadable_shard
            raise FileNotFoundError(f"{url} was rewritten since the record set was opened: it holds {found} records, "
                                    f"not {count}")

    def read(self, client: _Client, position: int) -> bytes:
        if self.reader is not None:
            return self.reader.read([position])[0]
        span = (int(self.ranges.begins[position]), int(self.ranges.ends[position]))
        return self.ranges.payload(position, client.get(self.url, self.query, span)[0])


class RangeReads:
    """A grain random-access source of the records of gs:// shards (file order), each read with
    one request of exactly its bytes. `counts`: the records of each shard, as the set was
    verified with (`records.open_set`); `endpoint` defaults to `endpoint_from_environment()`.
    Picklable: each process opens its own connections and reads each shard's index when it
    first reads from it."""

    def __init__(self, shards: Sequence[str], counts: Sequence[int], endpoint: str | None = None):
        self._shards, self._counts = tuple(shards), tuple(int(c) for c in counts)
        self._starts = np.cumsum((0,) + self._counts)
        self._endpoint = endpoint or endpoint_from_environment()
        self._client, self._pool, self._lock = None, None, threading.Lock()
        self._opened: dict[int, _Shard] = {}
        self._opening: dict[int, threading.Lock] = {}  # a lock per shard: others are read meanwhile

    def __getstate__(self):
        return dict(shards=self._shards, counts=self._counts, endpoint=self._endpoint)

    def __setstate__(self, state):
        self.__init__(state["shards"], state["counts"], state["endpoint"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return f"RangeReads({len(self._shards)} shards, {len(self)} records, {self._endpoint})"

    def __getitem__(self, key: int) -> bytes:
        if not 0 <= key < len(self):
            raise IndexError(f"record {key} of {len(self)}")
        shard = int(np.searchsorted(self._starts, key, side="right")) - 1
        return self._shard(shard).read(self._client, key - int(self._starts[shard]))

    def _getitems(self, keys: Sequence[int]) -> list[bytes]:
        """The records `keys`, fetched concurrently; the first failure is raised."""
        if self._pool is None:
            with self._lock:
                self._pool = self._pool or concurrent.futures.ThreadPoolExecutor(FETCH_THREADS, "range_reads")
        return list(self._pool.map(self.__getitem__, keys))

    __getitems__ = _getitems

    def _shard(self, index: int) -> _Shard:
        shard = self._opened.get(index)
        if shard is None:
            with self._lock:
                self._client = self._client or _Client(self._endpoint)
                opening = self._opening.setdefault(index, threading.Lock())
            with opening:  # one index read per shard and process, even when threads race to it
                if index not in self._opened:
                    self._opened[index] = _Shard(self._client, self._shards[index], self._counts[index])
                shard = self._opened[index]
        return shard
