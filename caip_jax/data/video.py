"""Frames from video files (PyAV), read lazily: a 1080p episode never sits in memory whole.

Frame i of a file is its i-th frame in presentation order: the i-th frame that decoding the
file from the start yields. To read frames of a late episode of a shared file (LeRobot v3.0
stores many episodes back to back in one mp4), `VideoFrames` seeks to a keyframe before the
episode and decodes forward from there, so an episode costs the same wherever it lies in the
file. Frames are identified by their timestamps, read once per file from its packets without
decoding, so seeking gives the frames of a full decode bit for bit, with B-frames, open GOPs and
irregular keyframe spacing alike.
"""
import dataclasses
import functools
import itertools
import os
from collections.abc import Iterable, Iterator

import av
import numpy as np

from caip_jax.data.schema import EpisodeError


@dataclasses.dataclass
class VideoFrames:
    """Frames `first` .. `first + count - 1` of the video at `path`.

    Several episodes stored back to back in one file (LeRobot v3.0) are several VideoFrames over
    the same path with different `first`. `seek=False` decodes every read from the start of the
    file, as this class did before it could seek (kept to measure the difference).
    """

    path: str
    first: int
    count: int
    seek: bool = True
    decoded: int = dataclasses.field(default=0, init=False, repr=False)  # frames the last iterate decoded

    def __len__(self) -> int:
        return self.count

    def iterate(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        """Frames at sorted episode-relative `indices`, [H, W, 3] uint8 RGB each, decoding once
        from a keyframe at or before the first wanted frame to the last wanted frame."""
        indices = np.asarray(indices)
        if not len(indices):
            return
        if indices.min() < 0 or indices.max() >= self.count:
            raise IndexError(f"{self.path}: frames {indices.min()}..{indices.max()} outside 0..{self.count - 1}")
        wanted = iter((self.first + indices).tolist())
        target = next(wanted)
        self.decoded = 0
        try:
            for position, frame in _decode(self.path, target if self.seek else 0):
                self.decoded += 1
                if position < target:
                    continue
                if position > target:
                    raise EpisodeError(f"{self.path}: frame {target} did not decode (the decoder skipped it)")
                image = frame.to_ndarray(format="rgb24")
                while position == target:  # a frame wanted twice is yielded twice
                    yield image
                    target = next(wanted, None)
                    if target is None:
                        return
        except (av.error.FFmpegError, OSError) as error:
            raise EpisodeError(f"{self.path}: cannot decode video: {error}") from error
        raise EpisodeError(f"{self.path}: video ends before frame {target - self.first} (of {self.count})")

    def read(self, indices: np.ndarray) -> np.ndarray:
        return np.stack(list(self.iterate(indices)))


def count_frames(path: str) -> int:
    """The number of frames in the video at `path`, from its packets (without decoding: the
    container's own frame count is often missing or wrong); by decoding where packets lack
    timestamps."""
    try:
        index = _packet_index(path)
        if index is not None:
            return len(index.pts)
        with av.open(path) as container:
            return sum(1 for _ in container.decode(video=0))
    except (av.error.FFmpegError, OSError) as error:
        raise EpisodeError(f"{path}: cannot decode video: {error}") from error


@dataclasses.dataclass(frozen=True)
class _PacketIndex:
    """The packets of a file's first video stream (one per frame) in decode order: their
    presentation timestamps `pts` [F] and `keyframe` flags [F]; `order` [F] sorts them into
    presentation order (frame i is packet order[i], shown at frame_pts[i])."""

    pts: np.ndarray
    keyframe: np.ndarray
    order: np.ndarray
    frame_pts: np.ndarray

    @classmethod
    def of(cls, pts: np.ndarray, keyframe: np.ndarray) -> "_PacketIndex":
        order = np.argsort(pts, kind="stable")
        return cls(pts, keyframe, order, pts[order])

    def frame_of(self, pts: int) -> int:
        """The frame (presentation position) with timestamp `pts`; -1 if none has it."""
        position = int(np.searchsorted(self.frame_pts, pts))
        return position if position < len(self.pts) and self.frame_pts[position] == pts else -1

    def packet_of(self, pts: int | None) -> int:
        """The number of the packet with timestamp `pts` in decode order; -1 if none has it."""
        frame = -1 if pts is None else self.frame_of(pts)
        return -1 if frame < 0 else int(self.order[frame])

    def start_packet(self, frame: int) -> int:
        """The last keyframe packet from which decoding yields frame `frame` and every later one
        exactly: it shows no later than `frame` (so `frame` is not one of its leading pictures,
        which would need the previous GOP) and no packet before it shows `frame` or a later one.
        0 (the start of the file) if there is none."""
        target = self.frame_pts[frame]
        latest_before = np.maximum.accumulate(np.concatenate([[np.iinfo(np.int64).min], self.pts[:-1]]))
        candidates = np.flatnonzero(self.keyframe & (self.pts <= target) & (latest_before < target))
        return int(candidates[-1]) if len(candidates) else 0


def _packet_index(path: str) -> _PacketIndex | None:
    stat = os.stat(path)
    return _read_packet_index(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_packet_index(path: str, size: int, mtime_ns: int) -> _PacketIndex | None:
    """The file's `_PacketIndex` (demuxing reads the packets, decoding none of them), cached per
    file version (size, mtime) so that the episodes of a shared file read it once per process.
    None where some packet has no timestamp or two share one: frames are then counted from the
    start of the file."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        packets = [(packet.pts, packet.is_keyframe) for packet in container.demux(stream) if packet.size]
    pts = [p for p, _ in packets]
    if None in pts or len(set(pts)) != len(pts):
        return None
    return _PacketIndex.of(np.asarray(pts, np.int64), np.array([k for _, k in packets], bool))


def _decode(path: str, frame: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """(frame number, frame) of the video at `path` in presentation order, from a keyframe at or
    before frame `frame` to the end."""
    index = _packet_index(path)
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if index is None:
            yield from enumerate(container.decode(stream))
            return
        if frame >= len(index.pts):
            return  # the file ends before it
        for packet in _packets_from(container, stream, index, index.start_packet(frame)):
            for decoded in packet.decode():
                position = index.frame_of(decoded.pts)
                if position < 0:
                    raise EpisodeError(f"{path}: decoded a frame at pts {decoded.pts}, which no packet has")
                yield position, decoded


def _packets_from(container, stream, index: _PacketIndex, start: int) -> Iterator[av.Packet]:
    """The packets of `stream` from packet `start`, or from a keyframe before it where the
    container's seek lands there. Some containers (MPEG-TS) seek by byte position and can land
    past it: then from the start of the file."""
    if not start:
        return container.demux(stream)
    container.seek(int(index.pts[start]), stream=stream, backward=True, any_frame=False)
    packets, landed = _landed(container, stream, index)
    if 0 <= landed <= start:
        return packets
    container.seek(0)
    packets, landed = _landed(container, stream, index)
    if landed != 0:
        raise EpisodeError(f"{container.name}: cannot seek back to the first frame (landed on packet {landed})")
    return packets


def _landed(container, stream, index: _PacketIndex) -> tuple[Iterator[av.Packet], int]:
    """The packets from where the container stands, and the number of the first (-1: unknown)."""
    packets = container.demux(stream)
    first = next(packets, None)
    if first is None:
        return iter(()), -1
    return itertools.chain([first], packets), index.packet_of(first.pts)


def write_video(path: str, frames: Iterable[np.ndarray], fps: float = 30.0, codec: str = "libx264",
                options: dict[str, str] | None = None) -> None:
    """Writes [H, W, 3] uint8 frames (an [N, H, W, 3] array or any iterable of them; even H and
    W) as a video, H.264 at crf 10 unless `codec` and encoder `options` say otherwise; the
    container follows the extension of `path`. For tests, benchmarks and the demo."""
    with av.open(path, "w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=int(round(fps)))
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "10"} if options is None else options
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
