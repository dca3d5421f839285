"""Byte ranges of the records of an ArrayRecord file, so that each record is one ranged read.

ArrayRecord files are Riegeli files: 64 KiB blocks, each starting with a 24-byte block header;
between them chunks (40-byte header + data), which block headers may interrupt anywhere, even
inside a chunk header. Written with `records.WRITER_OPTIONS` ("group_size:1,uncompressed") every
record is one simple chunk ('r') holding one record, uncompressed:

    chunk header (40) | 0 (no compression) | 1 (size of the sizes) | varint record size | record

ArrayRecord ends the file with a footer chunk (records: a RiegeliFooterMetadata proto, then one
ArrayRecordFooter {chunk_offset, decoded_data_size, num_records} per chunk, compressed like the
data), a padding chunk up to a block boundary, and a postscript: the last block, one simple
chunk of 3 copies of RiegeliPostscript {footer_offset, magic}. The footer thus gives each
record's chunk offset and size, from which its payload's range follows: nothing but the tail
of the file is read. Hashes are not verified (the ranged reads are checked by the caller's
decoder, and a damaged footer most likely fails the layout checks below).

Anything else (other group sizes, compression, transposed chunks, a truncated or damaged
file) raises RecordLayoutError: callers fall back to array_record's own reader.
"""
import dataclasses
from typing import Callable

import numpy as np

BLOCK_SIZE = 1 << 16
_BLOCK_HEADER = 24
_USABLE = BLOCK_SIZE - _BLOCK_HEADER
_CHUNK_HEADER = 40
_MAGIC = 0x71930E704FDAE05E  # RiegeliPostscript.magic
_COMPRESSION = {0: "none", ord("b"): "brotli", ord("z"): "zstd", ord("s"): "snappy"}
_TAIL = 4 * BLOCK_SIZE  # first read: the postscript, and a footer of up to ~19k records (~10 B each)


class RecordLayoutError(ValueError):
    """The file is not ArrayRecord written with "group_size:1,uncompressed", or is damaged."""


@dataclasses.dataclass(frozen=True)
class RecordRanges:
    """Record i's payload is file[begins[i]:ends[i]] less the block headers inside that span
    (a record longer than ~64 KiB always spans some). Both int64 [num_records]."""
    begins: np.ndarray
    ends: np.ndarray

    def __len__(self):
        return len(self.begins)

    def payload(self, index: int, raw: bytes) -> bytes:
        """Record `index`'s bytes from raw = file[begins[index]:ends[index]]."""
        begin = int(self.begins[index])
        if len(raw) != self.ends[index] - begin:
            raise ValueError(f"record {index}: got {len(raw)} bytes, its range holds {self.ends[index] - begin}")
        return _strip(raw, begin)


def read_ranges(read: Callable[[int, int], bytes], size: int, tail: int = _TAIL) -> RecordRanges:
    """The ranges of every record of a file of `size` bytes that `read(offset, length)` reads.

    Two reads at most: the last `tail` bytes (postscript, and the footer when it fits), then
    the footer if it did not fit.
    """
    if size < 2 * BLOCK_SIZE or size % BLOCK_SIZE:
        raise RecordLayoutError(f"file size {size} is not 2 or more times 64 KiB: truncated, or not ArrayRecord")
    tail_begin = size - min(size, -(-max(tail, BLOCK_SIZE) // BLOCK_SIZE) * BLOCK_SIZE)
    raw_tail = _read(read, tail_begin, size - tail_begin)

    sizes, values = _chunk_records(_strip(raw_tail[-BLOCK_SIZE:], size - BLOCK_SIZE), "postscript")
    postscript = _fields(values[:sizes[0]], "postscript") if len(sizes) == 3 else {}  # 3 copies
    footer_offset = postscript.get(1, [None])[0]
    if postscript.get(2, [None])[0] != _MAGIC or not isinstance(footer_offset, int):
        found = postscript or f"{len(sizes)} records"
        raise RecordLayoutError(f"no ArrayRecord postscript in the last block (found {found}): damaged, or not ArrayRecord")
    footer_end = size - BLOCK_SIZE
    if not 0 < footer_offset < footer_end or 0 < footer_offset % BLOCK_SIZE < _BLOCK_HEADER:
        raise RecordLayoutError(f"postscript's footer offset {footer_offset} is no chunk boundary before {footer_end}")
    if footer_offset >= tail_begin:
        raw_footer = raw_tail[footer_offset - tail_begin:footer_end - tail_begin]
    else:
        raw_footer = _read(read, footer_offset, footer_end - footer_offset)
    sizes, values = _chunk_records(_strip(raw_footer, footer_offset), "footer")

    metadata = _fields(values[:sizes[0]], "footer metadata").get(1, [b""])[0]  # .array_record_metadata
    metadata = _fields(metadata, "footer metadata")
    version, num_chunks, num_records = (metadata.get(k, [None])[0] for k in (1, 2, 3))
    options = metadata.get(4, [b""])[0]
    options = options.decode(errors="replace") if isinstance(options, bytes) else str(options)
    if version != 1 or num_chunks != len(sizes) - 1:
        raise RecordLayoutError(f"footer metadata {metadata} is not ArrayRecord v1 with {len(sizes) - 1} chunks")
    _check_options(options)

    chunks = _varints(values[sizes[0]:], "footer")  # (tag, value) x 3 a chunk
    if chunks.size != 6 * num_chunks or (chunks.reshape(-1, 6)[:, ::2] != [1 << 3, 2 << 3, 3 << 3]).any():
        raise RecordLayoutError("footer entries are not {chunk_offset, decoded_data_size, num_records} protos")
    offsets, sizes, counts = chunks.reshape(-1, 6)[:, 1::2].T.astype(np.int64)
    if (counts != 1).any() or num_records != num_chunks:
        found = np.unique(counts).tolist()
        raise RecordLayoutError(
            f"chunks hold {found} records ({num_records} in {num_chunks} chunks), want 1 each: group_size is not 1")

    start = _logical(offsets)
    head = _CHUNK_HEADER + 2 + _varint_len(sizes)  # compression byte, size of the sizes, the size
    begins = _physical_begin(start + head)
    chunk_ends = _physical_end(start + head + sizes)
    ends = np.where(sizes > 0, chunk_ends, begins)
    # Each chunk must end exactly where the next begins: catches compressed or transposed
    # chunks (other sizes) in files whose footer lacks writer options, and a damaged footer.
    following = np.append(offsets[1:], footer_offset)
    fits = following == chunk_ends
    if "pad_to_block_boundary:true" in options:
        fits |= (following % BLOCK_SIZE == 0) & (following > chunk_ends)
    in_header = (offsets % BLOCK_SIZE > 0) & (offsets % BLOCK_SIZE < _BLOCK_HEADER)
    if (bad := np.flatnonzero(~fits | in_header | (offsets < 64))).size:
        i = bad[0]
        raise RecordLayoutError(
            f"chunk {i} at {offsets[i]} (record of {sizes[i]} bytes) would end at {chunk_ends[i]} as an "
            f"uncompressed simple chunk, but the next chunk begins at {following[i]}")
    return RecordRanges(begins, ends)


def _read(read, offset: int, length: int) -> bytes:
    raw = read(offset, length)
    if len(raw) != length:
        raise RecordLayoutError(f"read({offset}, {length}) returned {len(raw)} bytes: file shorter than its size?")
    return bytes(raw)


def _strip(raw: bytes, start: int) -> bytes:
    """raw = file[start:start + len(raw)] without the block headers in it (start must not lie
    inside one)."""
    view, pieces, at = memoryview(raw), [], 0
    for boundary in range(-(-start // BLOCK_SIZE) * BLOCK_SIZE - start, len(raw), BLOCK_SIZE):
        pieces.append(view[at:boundary])
        at = boundary + _BLOCK_HEADER
    pieces.append(view[at:])
    return b"".join(pieces)


def _chunk_records(data: bytes, what: str) -> tuple[np.ndarray, bytes]:
    """The record sizes (uint64 [n]) and concatenated records of the uncompressed simple chunk
    at the start of `data` (block headers removed)."""
    if len(data) < _CHUNK_HEADER:
        raise RecordLayoutError(f"{what}: {len(data)} bytes, no room for a chunk header")
    fields = ((8, 16), (24, 25), (25, 32), (32, 40))  # the hashes are skipped
    data_size, kind, num_records, decoded = (int.from_bytes(data[a:b], "little") for a, b in fields)
    body = data[_CHUNK_HEADER:_CHUNK_HEADER + data_size]
    if kind != ord("r") or len(body) != data_size or not body:
        raise RecordLayoutError(
            f"{what}: chunk type {kind:#x} with {len(body)} of {data_size} data bytes, want a simple chunk ('r')")
    if body[0]:
        name = _COMPRESSION.get(body[0], f"{body[0]:#x}")
        raise RecordLayoutError(f"{what} chunk is compressed ({name}): written with compression, want 'uncompressed'")
    sizes_size, at = _varint(body, 1, what)
    sizes = _varints(body[at:at + sizes_size], what)
    values = body[at + sizes_size:]
    if not len(sizes) or len(sizes) != num_records or sizes.sum() != len(values) or len(values) != decoded:
        raise RecordLayoutError(
            f"{what}: record sizes {sizes[:8].tolist()}... disagree with the chunk "
            f"({num_records} records, {len(values)} bytes)")
    return sizes, values


def _check_options(options: str):
    """ArrayRecord 0.8.6 writes its options in the footer ("group_size:1,transpose:false,
    pad_to_block_boundary:false,uncompressed,max_parallelism:1"); files of versions before
    layout.proto had writer_options pass on the layout checks alone."""
    if not options:
        return
    given = dict(o.partition(":")[::2] for o in options.split(","))
    if given.get("group_size") != "1" or given.get("transpose", "false") != "false" or "uncompressed" not in given:
        raise RecordLayoutError(f"writer options {options!r}: want group_size:1, transpose:false, uncompressed")


def _varint(data: bytes, at: int, what: str) -> tuple[int, int]:
    value = shift = 0
    while at < len(data) and shift < 64:
        value |= (data[at] & 0x7F) << shift
        shift, at = shift + 7, at + 1
        if data[at - 1] < 0x80:
            return value, at
    raise RecordLayoutError(f"{what}: truncated varint")


def _varints(data: bytes, what: str) -> np.ndarray:
    """uint64 [n]: the n varints that are all of `data`, decoded at once (footers hold ~6 a record)."""
    b = np.frombuffer(data, np.uint8)
    if not b.size:
        return np.zeros(0, np.uint64)
    ends = np.flatnonzero(b < 0x80)
    if not ends.size or ends[-1] != b.size - 1:
        raise RecordLayoutError(f"{what}: truncated varint")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise RecordLayoutError(f"{what}: varint longer than 10 bytes")
    values = (b[starts] & 0x7F).astype(np.uint64)
    for k in range(1, lengths.max()):  # byte k of the varints that have one
        i = np.flatnonzero(lengths > k)
        values[i] |= (b[starts[i] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return values


def _fields(message: bytes, what: str) -> dict[int, list]:
    """Field number -> values of a proto message with varint and length-delimited fields only."""
    if not isinstance(message, bytes):
        raise RecordLayoutError(f"{what}: a number where a message belongs")
    fields, at = {}, 0
    while at < len(message):
        tag, at = _varint(message, at, what)
        if tag & 7 == 0:
            value, at = _varint(message, at, what)
        elif tag & 7 == 2:
            length, at = _varint(message, at, what)
            value, at = message[at:at + length], at + length
            if len(value) != length:
                raise RecordLayoutError(f"{what}: truncated field {tag >> 3}")
        else:
            raise RecordLayoutError(f"{what}: field {tag >> 3} has wire type {tag & 7}: not an ArrayRecord proto")
        fields.setdefault(tag >> 3, []).append(value)
    return fields


def _varint_len(values: np.ndarray) -> np.ndarray:
    return 1 + sum((values >> (7 * k) > 0).astype(np.int64) for k in range(1, 10))


# Chunk contents are counted in "logical" positions, which skip block headers. A logical
# position at a block's edge has two physical ones: a payload begins after that block's
# header and ends before it, so that no range holds a block header at either end.
def _logical(physical):
    return physical - _BLOCK_HEADER * (-(-physical // BLOCK_SIZE))


def _physical_begin(logical):
    return logical // _USABLE * BLOCK_SIZE + _BLOCK_HEADER + logical % _USABLE


def _physical_end(logical):
    return _physical_begin(logical - 1) + 1
