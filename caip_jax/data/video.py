"""Frames from video files (PyAV), read lazily: a 1080p episode never sits in memory whole."""
import dataclasses
from collections.abc import Iterator

import av
import numpy as np

from caip_jax.data.schema import EpisodeError


@dataclasses.dataclass
class VideoFrames:
    """Frames `first` .. `first + count - 1` of the video at `path` (0-based decode order).

    Several episodes stored back to back in one file (LeRobot v3.0) are several VideoFrames
    over the same path with different `first`.
    """

    path: str
    first: int
    count: int

    def __len__(self) -> int:
        return self.count

    def iterate(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        """Frames at sorted episode-relative `indices`, [H, W, 3] uint8 RGB each, decoding once
        from the start of the file to the last wanted frame."""
        indices = np.asarray(indices)
        if not len(indices):
            return
        if indices.min() < 0 or indices.max() >= self.count:
            raise IndexError(f"{self.path}: frames {indices.min()}..{indices.max()} outside 0..{self.count - 1}")
        wanted = iter(self.first + indices)
        target = next(wanted)
        try:
            with av.open(self.path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for position, frame in enumerate(container.decode(stream)):
                    if position < target:
                        continue
                    image = frame.to_ndarray(format="rgb24")
                    while position == target:  # a frame wanted twice is yielded twice
                        yield image
                        target = next(wanted, None)
                        if target is None:
                            return
        except av.error.FFmpegError as error:
            raise EpisodeError(f"{self.path}: cannot decode video: {error}") from error
        raise EpisodeError(f"{self.path}: video ends before frame {target - self.first} (of {self.count})")

    def read(self, indices: np.ndarray) -> np.ndarray:
        return np.stack(list(self.iterate(indices)))


def count_frames(path: str) -> int:
    """The number of decodable frames in the video at `path` (decodes it; the container's frame
    count is often missing or wrong)."""
    try:
        with av.open(path) as container:
            return sum(1 for _ in container.decode(video=0))
    except av.error.FFmpegError as error:
        raise EpisodeError(f"{path}: cannot decode video: {error}") from error


def write_video(path: str, frames: np.ndarray, fps: float = 30.0) -> None:
    """Writes [N, H, W, 3] uint8 frames as an H.264 mp4 (even H and W). For tests and the demo."""
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
