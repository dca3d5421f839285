"""The metrics log's TensorBoard events hold every logged scalar, read back as TFRecords of
tensorboardX's own Event protos; and a training process never imports torch for them."""
import glob
import os
import struct
import subprocess
import sys
import textwrap

from tensorboardX.proto.event_pb2 import Event


def tf_records(path: str) -> list[bytes]:
    """The records of a TFRecord file: length (u64), its CRC, data, the data's CRC."""
    with open(path, "rb") as f:
        data = f.read()
    records, at = [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        records.append(data[at + 12:at + 12 + length])
        at += 12 + length + 4
    return records


def test_tensorboard_holds_every_logged_scalar_and_torch_is_never_imported(tmp_path):
    logged = [dict(step=1, loss=2.5, top1=0.25, note="text"), dict(step=2, loss=1.5, top1=0.5)]
    program = textwrap.dedent(f"""
        import sys
        from caip_jax import metrics
        log = metrics.MetricsLog({str(tmp_path)!r}, total_steps=2)
        for m in {logged!r}:
            log.write(m)
        log.close()
        assert "torch" not in sys.modules, "torch was imported"
    """)
    subprocess.run([sys.executable, "-c", program], check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    (path,) = glob.glob(str(tmp_path / "tensorboard" / "*tfevents*"))
    events = [Event.FromString(r) for r in tf_records(path)]
    got = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value}
    assert got == {(k, m["step"]): v for m in logged for k, v in m.items() if k not in ("step", "note")}
