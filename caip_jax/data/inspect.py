"""Looking at a record set: statistics, a contact sheet of frames with the hand keypoints
projected on them, and processed samples dumped for debugging."""
import collections
import io

import numpy as np
from PIL import Image, ImageDraw

from caip_jax import actions, storage
from caip_jax.data import pipeline, records
from caip_jax.data.schema import HANDS

HAND_COLOURS = ((40, 120, 255), (255, 60, 40))  # left blue, right red
# Bones of the 21-keypoint hand: the wrist to each finger's first joint, then along the finger.
BONES = [(0, 1 + 4 * f) for f in range(5)] + [(j, j + 1) for f in range(5) for j in range(1 + 4 * f, 4 + 4 * f)]


def spread_records(directory: str, num: int) -> list[bytes]:
    """At most `num` records spread evenly over the record set, read by random access, so that
    a set of any size is looked at in bounded time and memory."""
    source = pipeline.record_dataset(directory)
    return [source[int(i)] for i in np.unique(np.linspace(0, len(source) - 1, min(num, len(source))).astype(int))]


def describe(directory: str, max_records: int = 10_000) -> dict:
    """Counts per source, view and label, hand presence, bytes per record (over at most
    `max_records` records spread over the set), the number of records, and the conversion
    summary."""
    raw = spread_records(directory, max_records)
    samples = [records.decode(r) for r in raw]
    count = lambda values: dict(collections.Counter(values).most_common())
    valid = np.stack([s["valid"] for s in samples])  # [n, T+1, 2]
    return dict(
        records=len(pipeline.record_dataset(directory)),
        described=len(samples),
        episodes=len({(s["source"], s["episode_id"]) for s in samples}),
        bytes_per_record=float(np.mean([len(r) for r in raw])),
        jpeg_bytes_per_record=float(np.mean([len(s["image"]) for s in samples])),
        future_steps=int(valid.shape[1] - 1),
        sources=count(s["source"] for s in samples),
        views=count(s["view"] for s in samples),
        labels={
            name: count(s["labels"][name] for s in samples if name in s["labels"])
            for name in sorted({name for s in samples for name in s["labels"]})
        },
        hand_present_fraction=dict(zip(HANDS, valid.mean(axis=(0, 1)).round(4).tolist())),
        text_examples=sorted({s["text"] for s in samples})[:10],
        conversion=records.read_json(directory, "summary.json"),
    )


def draw_hands(sample: dict) -> Image.Image:
    """The sample's frame with the anchor-time keypoints of each present hand projected on it."""
    image = Image.open(io.BytesIO(sample["image"])).convert("RGB")
    k = sample["intrinsics"]
    if not np.isfinite(k).all():
        return image
    points = actions.decompress_poses(sample["poses"])[0, :, :, :3, 3]  # [2, 21, 3] camera frame
    draw = ImageDraw.Draw(image)
    for hand in range(len(HANDS)):
        if not sample["valid"][0, hand] or (points[hand, :, 2] <= 0).any():
            continue
        uv = points[hand, :, :2] / points[hand, :, 2:] * [k[0, 0], k[1, 1]] + [k[0, 2], k[1, 2]]
        for a, b in BONES:
            draw.line([tuple(uv[a]), tuple(uv[b])], fill=HAND_COLOURS[hand], width=1)
        for u, v in uv:
            draw.ellipse([u - 1.5, v - 1.5, u + 1.5, v + 1.5], fill=HAND_COLOURS[hand])
    return image


def contact_sheet(directory: str, path: str, num: int = 16, tile: int = 192) -> None:
    """A grid of `num` frames spread over the record set, keypoints drawn, captions below."""
    picks = [records.decode(r) for r in spread_records(directory, num)]
    cols = int(np.ceil(np.sqrt(len(picks))))
    rows = int(np.ceil(len(picks) / cols))
    caption = 28
    sheet = Image.new("RGB", (cols * tile, rows * (tile + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(picks):
        x, y = (i % cols) * tile, (i // cols) * (tile + caption)
        frame = draw_hands(sample)
        scale = tile / max(frame.size)
        frame = frame.resize((round(frame.width * scale), round(frame.height * scale)))
        sheet.paste(frame, (x, y))
        draw.text((x + 2, y + tile + 1), sample["text"][:34], fill="black")
        draw.text((x + 2, y + tile + 14), f"{sample['episode_id'][:22]} #{sample['frame_index']}", fill="gray")
    storage.write_encoded(path, lambda f: sheet.save(f, format="PNG"))


def dump(directory: str, preprocess: pipeline.Preprocess, num: int, path: str, delta: str = "anchor") -> None:
    """The first `num` samples in record order, processed without augmentation and with the
    action unnormalised, to an .npz: image, text_ids, action [N, T, 2, 21, 9], action_mask,
    episode_id, frame_index."""
    samples = pipeline.eval_samples(directory, preprocess)
    rows = [samples[i] for i in range(min(num, len(samples)))]
    chunks = [actions.compressed_action_chunk(r, r["valid"], preprocess.horizon, delta) for r in rows]
    storage.write_encoded(path, lambda f: np.savez(
        f,
        image=np.stack([r["image"] for r in rows]),
        text_ids=np.stack([r["text"] for r in rows]),
        action=np.stack([a for a, _ in chunks]),
        action_mask=np.stack([m for _, m in chunks]),
        episode_id=np.array([r["episode_id"] for r in rows]),
        frame_index=np.array([r["frame_index"] for r in rows]),
    ))
