"""VideoFrames over files holding many episodes back to back (LeRobot v3.0): reading an episode
seeks near it, and gives exactly the frames a full decode of the file gives."""
import av
import numpy as np
import pytest

from caip_jax.data import video
from caip_jax.data.schema import EpisodeError

H, W = 48, 64
LENGTHS = (13, 21, 8, 17, 25)  # episodes back to back in one file
# (container, codec, encoder options): B-frames, open GOPs (leading pictures need the previous
# GOP), keyframes at scene cuts, a container without decode timestamps (Matroska), one whose
# seek lands past the keyframe asked for (MPEG-TS seeks by byte position) and one with no
# timestamps at all (raw H.264).
X264 = "bframes=2:b-adapt=0:keyint=10:min-keyint=10:scenecut=0"
ENCODINGS = {
    "h264-bframes-open-gop-7": ("mp4", "libx264", {"crf": "23", "x264-params":
                                "bframes=3:b-adapt=0:open-gop=1:keyint=7:min-keyint=7:scenecut=0"}),
    "h264-bpyramid-scene-cuts": ("mp4", "libx264", {"crf": "18", "x264-params":
                                 "bframes=3:b-pyramid=normal:keyint=12:min-keyint=1"}),
    "hevc-open-gop-9": ("mp4", "libx265", {"crf": "23", "x265-params":
                        "keyint=9:bframes=3:open-gop=1:log-level=error"}),
    "mpeg4-bframes": ("mp4", "mpeg4", {"g": "8", "bf": "2"}),
    "h264-matroska": ("mkv", "libx264", {"crf": "23", "x264-params": X264}),
    "h264-mpegts": ("ts", "libx264", {"crf": "23", "x264-params": X264}),
    "h264-raw": ("h264", "libx264", {"crf": "23", "x264-params": X264}),
}


def textured_frames(lengths, seed=0) -> np.ndarray:
    """[sum(lengths), H, W, 3] frames: a noise texture per episode (a scene cut between episodes),
    drifting and re-noised each frame, so that a frame decoded from the wrong references differs."""
    rng = np.random.default_rng(seed)
    out = []
    for length in lengths:
        texture = rng.integers(0, 256, (H, W, 3)).astype(np.int16)
        for frame in range(length):
            moved = np.roll(texture, (frame, 2 * frame), axis=(0, 1))
            out.append(np.clip(moved + rng.integers(-24, 24, (H, W, 3)), 0, 255).astype(np.uint8))
    return np.stack(out)


def full_decode(path: str) -> list[np.ndarray]:
    """Every frame of the file, decoding from the start with PyAV directly (the reference)."""
    with av.open(path) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def starts(lengths) -> list[int]:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()


@pytest.fixture(scope="module", params=sorted(ENCODINGS))
def shared_file(request, tmp_path_factory):
    extension, codec, options = ENCODINGS[request.param]
    path = str(tmp_path_factory.mktemp("video") / f"episodes.{extension}")
    video.write_video(path, textured_frames(LENGTHS), codec=codec, options=options)
    return path, full_decode(path)


def test_each_episode_reads_the_frames_of_a_full_decode(shared_file):
    path, reference = shared_file
    assert len(reference) == sum(LENGTHS) == video.count_frames(path)
    for episode in (0, len(LENGTHS) // 2, len(LENGTHS) - 1):  # first, middle, last
        first, count = starts(LENGTHS)[episode], LENGTHS[episode]
        for seek in (True, False):
            frames = video.VideoFrames(path, first, count, seek=seek)
            got = frames.read(np.arange(count))
            np.testing.assert_array_equal(got, np.stack(reference[first:first + count]), err_msg=f"{episode} {seek}")
        # Sparse, repeated and late indices alone (a seek straight to the end of the episode).
        picked = np.array([count - 3, count - 3, count - 1])
        np.testing.assert_array_equal(video.VideoFrames(path, first, count).read(picked),
                                      np.stack([reference[first + i] for i in picked]))


def test_a_late_episode_decodes_from_a_keyframe_near_it(tmp_path):
    """24 episodes of 20 frames, a keyframe every 10: the last episode decodes its own 20 frames
    and at most one GOP more, not the 460 frames before it."""
    lengths = (20,) * 24
    path = str(tmp_path / "episodes.mp4")
    video.write_video(path, textured_frames(lengths), codec="libx264", options={"crf": "23", "x264-params": X264})
    reference = full_decode(path)
    for episode in (0, 12, 23):
        first = starts(lengths)[episode]
        frames = video.VideoFrames(path, first, 20)
        np.testing.assert_array_equal(frames.read(np.arange(20)), np.stack(reference[first:first + 20]))
        assert 20 <= frames.decoded <= 20 + 10, (episode, frames.decoded)
        from_start = video.VideoFrames(path, first, 20, seek=False)
        from_start.read(np.arange(20))
        assert from_start.decoded == first + 20


def test_errors_name_the_file(tmp_path):
    path = str(tmp_path / "short.mp4")
    video.write_video(path, textured_frames((6,)))
    with pytest.raises(IndexError, match="outside 0..5"):
        video.VideoFrames(path, 0, 6).read(np.array([6]))
    with pytest.raises(EpisodeError, match="video ends before frame 6"):
        video.VideoFrames(path, 0, 8).read(np.array([6]))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(EpisodeError, match="broken.mp4: cannot decode video"):
        video.count_frames(str(tmp_path / "broken.mp4"))
    with pytest.raises(EpisodeError, match="broken.mp4: cannot decode video"):
        video.VideoFrames(str(tmp_path / "broken.mp4"), 0, 1).read(np.array([0]))


def test_a_keyframe_preceded_by_a_later_shown_packet_is_no_start():
    """Packets (pts) in decode order: K0 P6 B2 K4 K8 P10 B9. The frame at pts 6 is decoded
    before the keyframe at pts 4, so no read of pts 4 or later may start at that keyframe, which
    a rule of "the last keyframe shown no later than the first wanted frame" would pick."""
    index = video._PacketIndex.of(np.array([0, 6, 2, 4, 8, 10, 9]), np.array([1, 0, 0, 1, 1, 0, 0], bool))
    # Frames in presentation order: pts 0 2 4 6 8 9 10.
    assert [index.start_packet(frame) for frame in range(7)] == [0, 0, 0, 0, 4, 4, 4]
