"""Reading one episode of a video file that holds many back to back (LeRobot v3.0), by where the
episode lies in the file: seeking to a keyframe before it against decoding from the start of the
file (what `VideoFrames` did before it could seek), in one run on the same file.

  python benchmarks/video_seek.py [--episodes 200] [--frames 81] [--size 160] [--keyint 30]

The file: `episodes` episodes of `frames` frames each (smooth moving patterns, a scene change
per episode), H.264 with a keyframe at least every `keyint` frames and B-frames. For early,
middle and late episodes (three each), the seconds and decoded frames of reading every frame of
the episode, both ways, and the frames checked equal. The first read of the file also reads its
packet index (no decoding), reported apart. Writes benchmarks/results/video_seek.json.
"""
import os
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

import results_io
from caip_jax.data import video

flags.DEFINE_integer("episodes", 200, "Episodes in the shared file.")
flags.DEFINE_integer("frames", 81, "Frames per episode.")
flags.DEFINE_integer("size", 160, "Frame side (pixels, square).")
flags.DEFINE_integer("keyint", 30, "Most frames between keyframes (one second at 30 fps).")
FLAGS = flags.FLAGS


def episode_frames(episode: int, frames: int, size: int) -> np.ndarray:
    """[frames, size, size, 3] uint8: drifting sinusoids whose colour and frequency depend on the
    episode (so episodes start with a scene change, as concatenated recordings do)."""
    rng = np.random.default_rng(episode)
    y, x = np.mgrid[:size, :size] / size
    frequency, colour = rng.uniform(2, 6, 2), rng.uniform(60, 200, 3)
    t = np.arange(frames)[:, None, None] / frames
    wave = np.sin(2 * np.pi * (frequency[0] * x + t)) * np.cos(2 * np.pi * (frequency[1] * y - t))
    return np.clip(colour * (1 + 0.4 * wave[..., None]), 0, 255).astype(np.uint8)


def read_episode(path: str, episode: int, seek: bool) -> tuple[float, int, np.ndarray]:
    """Seconds and decoded frames to read every frame of `episode`, and the frames."""
    frames = video.VideoFrames(path, episode * FLAGS.frames, FLAGS.frames, seek=seek)
    start = time.perf_counter()
    out = frames.read(np.arange(FLAGS.frames))
    return time.perf_counter() - start, frames.decoded, out


def main(argv):
    del argv
    path = os.path.join(tempfile.mkdtemp(), "episodes.mp4")
    start = time.perf_counter()
    frames = (frame for e in range(FLAGS.episodes) for frame in episode_frames(e, FLAGS.frames, FLAGS.size))
    video.write_video(path, frames,
                      options={"crf": "23", "x264-params": f"keyint={FLAGS.keyint}:bframes=3"})
    encode_seconds = time.perf_counter() - start
    start = time.perf_counter()
    total = video.count_frames(path)  # reads (and caches) the packet index
    index_seconds = time.perf_counter() - start
    assert total == FLAGS.episodes * FLAGS.frames, total

    last = FLAGS.episodes - 1
    groups = dict(early=(0, 1, 2), middle=(last // 2 - 1, last // 2, last // 2 + 1), late=(last - 2, last - 1, last))
    load_before = os.getloadavg()[0]
    per_episode, summary = {}, {}
    for group, episodes in groups.items():
        for episode in episodes:
            seek_seconds, seek_decoded, seek_frames = read_episode(path, episode, seek=True)
            start_seconds, start_decoded, start_frames = read_episode(path, episode, seek=False)
            if not np.array_equal(seek_frames, start_frames):
                raise AssertionError(f"episode {episode}: seeking gave other frames than decoding from the start")
            per_episode[episode] = dict(group=group, seek_seconds=seek_seconds, seek_decoded=seek_decoded,
                                        from_start_seconds=start_seconds, from_start_decoded=start_decoded)
        median = lambda key: statistics.median(per_episode[e][key] for e in episodes)
        summary[group] = dict(seek_seconds=median("seek_seconds"), from_start_seconds=median("from_start_seconds"),
                              seek_decoded=median("seek_decoded"), from_start_decoded=median("from_start_decoded"),
                              speedup=median("from_start_seconds") / median("seek_seconds"))

    print(f"{FLAGS.episodes} episodes x {FLAGS.frames} frames, {FLAGS.size}x{FLAGS.size}, keyframe every "
          f"<= {FLAGS.keyint}: packet index {index_seconds:.3f} s once per file")
    print(f"{'episode':>8}{'group':>8}{'seek s':>9}{'decoded':>9}{'from start s':>14}{'decoded':>9}")
    for episode, figure in per_episode.items():
        print(f"{episode:>8}{figure['group']:>8}{figure['seek_seconds']:>9.3f}{figure['seek_decoded']:>9}"
              f"{figure['from_start_seconds']:>14.3f}{figure['from_start_decoded']:>9}")
    for group, figure in summary.items():
        print(f"{group}: seek {figure['seek_seconds']:.3f} s, from start {figure['from_start_seconds']:.3f} s "
              f"({figure['speedup']:.1f}x)")
    late_over_early = summary["late"]["seek_seconds"] / summary["early"]["seek_seconds"]
    print(f"late / early episode with seeking: {late_over_early:.2f}x "
          f"(from the start: {summary['late']['from_start_seconds'] / summary['early']['from_start_seconds']:.0f}x)")
    results_io.write("video_seek", dict(
        summary=summary,
        per_episode=per_episode,
        late_over_early_with_seek=late_over_early,
        late_over_early_from_start=summary["late"]["from_start_seconds"] / summary["early"]["from_start_seconds"],
        index_seconds=index_seconds,
        encode_seconds=encode_seconds,
        file_bytes=os.path.getsize(path),
        episodes=FLAGS.episodes,
        frames_per_episode=FLAGS.frames,
        size=FLAGS.size,
        keyint=FLAGS.keyint,
        identical_frames=True,
        machine=dict(results_io.machine(), load_average_before=load_before),
    ))


if __name__ == "__main__":
    app.run(main)
