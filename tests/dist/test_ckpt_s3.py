"""Checkpoints in object storage: `checkpoint.dir: s3://...` through s3fs, against a moto S3
server on 127.0.0.1 (no cloud account, no network). Two ranks write their shards to the bucket;
the commit marker, retention, listing and an exact resume work there as on a local disk."""

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import s3fs
from moto.server import ThreadedMotoServer

from parallel.checkpoint import list_checkpoints, read_meta
from parallel.ckpt_storage import WRITER_THREADS
from tests.dist.harness import run_layout

pytestmark = pytest.mark.dist

BUCKET = "fourfold-ckpt"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    # s3fs takes its endpoint from fsspec's config, which fsspec reads from the environment when
    # it is imported (the spawned ranks) and which this process, that imported it already, is
    # given directly; botocore reads its credentials from the environment.
    env = {
        "FSSPEC_S3_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.config.conf["s3"] = {"endpoint_url": url}
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(endpoint_url=url).mkdir(BUCKET)
    try:
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.config.conf.pop("s3", None)
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_s3_checkpoints_save_list_retain_and_resume_exactly(s3_endpoint: str, tmp_path: Path) -> None:
    root = f"s3://{BUCKET}/run-a/ckpt"
    sets = ["train.steps=6", "parallel.dp=2", f"checkpoint.dir={root}", "checkpoint.every=2", "checkpoint.keep_last=2"]
    full = run_layout(2, sets, tmp_path)
    found = list_checkpoints(root)
    assert [(c.step, c.complete) for c in found] == [(4, True), (6, True)]  # step 2 retired
    objects = s3fs.S3FileSystem(endpoint_url=s3_endpoint).ls(f"{BUCKET}/run-a/ckpt/step-00000006")
    shards = sum(o.endswith(".distcp") for o in objects)
    assert shards == 2 * WRITER_THREADS, objects  # each rank's shard in one file per writer thread
    assert read_meta(f"{root}/step-00000004")["rng"]["ranks"] == 2

    # Resumed from step 4 and saving every step: its step 5 makes the old step 6 an abandoned
    # timeline's, set aside (a copy of each object: S3 has no rename) and never resumed from.
    again = [*sets, "checkpoint.every=1", f"checkpoint.resume={root}/step-00000004"]
    resumed = run_layout(2, again, tmp_path)
    want = [m["loss"] for m in full["history"] if m["step"] > 4]
    got = [m["loss"] for m in resumed["history"]]
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), (got, want)
    assert [(c.step, c.complete) for c in list_checkpoints(root)] == [(5, True), (6, True)]
    names = [o.rsplit("/", 1)[-1] for o in s3fs.S3FileSystem(endpoint_url=s3_endpoint).ls(f"{BUCKET}/run-a/ckpt")]
    assert sum(n.startswith("abandoned-step-00000006-") for n in names) == 1, names
