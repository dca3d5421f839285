"""Record byte ranges from an ArrayRecord file's footer, checked against array_record's own reader."""
import numpy as np
import pytest
from array_record.python import array_record_module

from caip_jax.data import record_ranges
from caip_jax.data.record_ranges import BLOCK_SIZE, RecordLayoutError
from caip_jax.data.records import WRITER_OPTIONS

HEADER = 24  # block header
USABLE = BLOCK_SIZE - HEADER


def write(path, records, options=WRITER_OPTIONS):
    writer = array_record_module.ArrayRecordWriter(str(path), options)
    for record in records:
        writer.write(record)
    writer.close()
    return path.read_bytes()


def counted(data):
    """read(offset, length) over `data`, and the list of the calls it served."""
    calls = []
    def read(offset, length):
        calls.append((offset, length))
        return data[offset:offset + length]
    return read, calls


def check(path, records, **kwargs):
    """Ranges of the file `records` make, each record compared with array_record's reader; the
    ranges hold the payloads and the block headers between their bytes, nothing else."""
    data = write(path, records)
    read, calls = counted(data)
    ranges = record_ranges.read_ranges(read, len(data), **kwargs)
    reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
    assert len(ranges) == reader.num_records() == len(records)
    expected = reader.read(list(range(len(records)))) if records else []
    reader.close()
    for i, record in enumerate(expected):
        assert ranges.payload(i, data[ranges.begins[i]:ranges.ends[i]]) == record, i
    headers = np.where(ranges.ends > ranges.begins, (ranges.ends - 1) // BLOCK_SIZE - ranges.begins // BLOCK_SIZE, 0)
    assert (ranges.ends - ranges.begins - HEADER * headers).sum() == sum(map(len, expected))
    assert (ranges.begins % BLOCK_SIZE >= HEADER).all() and (ranges.ends >= ranges.begins).all()
    return ranges, calls


def test_random_sizes_cross_block_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    records = [rng.bytes(n) for n in rng.integers(0, 200_000, 40)] + [b"", rng.bytes(3 * BLOCK_SIZE)]
    ranges, calls = check(tmp_path / "a.array_record", records)
    assert len(calls) == 1  # the footer lies in the tail read with the postscript
    spans = (ranges.ends - 1) // BLOCK_SIZE - ranges.begins // BLOCK_SIZE
    assert (spans == 1).any() and (spans >= 3).any()


def test_every_alignment_at_a_block_boundary(tmp_path):
    """Chunks that begin 50 bytes before a block boundary to 10 after, a byte further each: a
    chunk header, then a record size, then a payload straddles the block header, and payloads
    begin and end exactly at its edges."""
    prefix = 40 + 2 + 3  # chunk header, compression, size of the sizes, a 3-byte varint size
    first = USABLE - 50 - (64 - HEADER) - prefix  # the first chunk follows the 64-byte file signature
    records = [b"\1" * first] + [bytes([i]) * (USABLE + 1 - prefix) for i in range(61)]  # chunks of USABLE + 1
    ranges, _ = check(tmp_path / "a.array_record", records)
    offset = ranges.begins % BLOCK_SIZE
    assert (offset == HEADER).any() and (ranges.ends % BLOCK_SIZE == 0).any()
    assert len(set(offset[(offset > HEADER) & (offset < HEADER + prefix)])) == prefix - 1  # straddling


@pytest.mark.parametrize("size", [0, 1, USABLE - 46, USABLE - 45, USABLE - 44, BLOCK_SIZE, 2 * USABLE - 45])
def test_single_record(tmp_path, size):
    check(tmp_path / "a.array_record", [bytes(range(256)) * (size // 256) + b"x" * (size % 256)])


def test_no_records(tmp_path):
    ranges, calls = check(tmp_path / "a.array_record", [])
    assert ranges.begins.shape == ranges.ends.shape == (0,) and len(calls) == 1


def test_many_tiny_records_footer_over_blocks(tmp_path):
    records = [bytes([i % 251]) * (i % 13) for i in range(8000)]  # footer ~80 KB: 2 blocks
    _, calls = check(tmp_path / "a.array_record", records)
    assert len(calls) == 1
    _, calls = check(tmp_path / "b.array_record", records, tail=BLOCK_SIZE)
    assert len(calls) == 2 and calls[1][0] < calls[0][0]


def test_padded_chunks(tmp_path):
    rng = np.random.default_rng(1)
    path, records = tmp_path / "a.array_record", [rng.bytes(n) for n in rng.integers(0, 100_000, 10)]
    data = write(path, records, WRITER_OPTIONS + ",pad_to_block_boundary:true")
    ranges = record_ranges.read_ranges(counted(data)[0], len(data))
    assert [ranges.payload(i, data[b:e]) for i, (b, e) in enumerate(zip(ranges.begins, ranges.ends))] == records


@pytest.mark.parametrize("options,message", [
    ("group_size:65536", "compressed (zstd)"),  # array_record's default
    ("group_size:65536,uncompressed", "group_size:65536"),
    ("group_size:1,zstd", "compressed (zstd)"),
    ("group_size:1,snappy", "compressed (snappy)"),
    ("group_size:1,brotli", "compressed (brotli)"),
    ("group_size:1,uncompressed,transpose", "transpose:true"),
])
def test_other_writer_options_refused(tmp_path, options, message):
    data = write(tmp_path / "a.array_record", [b"x" * n for n in range(0, 3000, 100)], options)
    with pytest.raises(RecordLayoutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        record_ranges.read_ranges(counted(data)[0], len(data))


@pytest.mark.parametrize("options,message", [
    ("group_size:2,uncompressed", r"chunks hold \[2\] records"),
    ("group_size:1,uncompressed,transpose", "would end at"),
])
def test_refused_without_writer_options(tmp_path, monkeypatch, options, message):
    """Footers of older array_record versions lack the writer options: the layout tells."""
    monkeypatch.setattr(record_ranges, "_check_options", lambda options: None)
    data = write(tmp_path / "a.array_record", [b"x" * n for n in range(0, 3000, 100)], options)
    with pytest.raises(RecordLayoutError, match=message):
        record_ranges.read_ranges(counted(data)[0], len(data))


def test_truncated_or_foreign_files_refused(tmp_path):
    rng = np.random.default_rng(2)
    data = write(tmp_path / "a.array_record", [rng.bytes(n) for n in rng.integers(0, 50_000, 20)])
    for size, message in [(len(data) - 1000, "not 2 or more times"), (len(data) - BLOCK_SIZE, "postscript"),
                          (BLOCK_SIZE, "not 2 or more times")]:
        with pytest.raises(RecordLayoutError, match=message):
            record_ranges.read_ranges(counted(data[:size])[0], size)
    with pytest.raises(RecordLayoutError, match="returned"):  # the size given is more than the file holds
        record_ranges.read_ranges(counted(data[:-BLOCK_SIZE])[0], len(data))
    with pytest.raises(RecordLayoutError, match="postscript"):
        record_ranges.read_ranges(counted(bytes(4 * BLOCK_SIZE))[0], 4 * BLOCK_SIZE)
