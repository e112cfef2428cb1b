"""`python -m parallel.train` with one moment of saving step 4 slowed down, so a test can kill
the process there. FOURFOLD_TEST_SLOW_AT picks the moment:

- shards: DCP has written this rank's shards, its .metadata is not there yet
- rename: every shard and .metadata are written under step-N.tmp, not yet renamed
- marker: renamed to step-N, its meta.json (the commit marker) not yet in place
"""

import os
import time

from torch.distributed.checkpoint import FileSystemWriter

from parallel import checkpoint, train

SLOW_S = float(os.environ.get("FOURFOLD_TEST_SLOW_S", "60"))
AT = os.environ.get("FOURFOLD_TEST_SLOW_AT", "rename")
_write_data, _commit, _publish = FileSystemWriter.write_data, checkpoint.Checkpointer._commit, checkpoint.publish


def _slow_write(self, plan, planner):  # noqa: ANN001, ANN202
    written = _write_data(self, plan, planner)
    if "step-00000004" in str(self.path):
        time.sleep(SLOW_S)
    return written


def _slow_commit(self, step, meta):  # noqa: ANN001, ANN202
    if step == 4:
        time.sleep(SLOW_S)
    return _commit(self, step, meta)


def _slow_publish(fs, path, meta):  # noqa: ANN001, ANN202
    if meta["step"] == 4:
        time.sleep(SLOW_S)
    return _publish(fs, path, meta)


if AT == "shards":
    FileSystemWriter.write_data = _slow_write
elif AT == "rename":
    checkpoint.Checkpointer._commit = _slow_commit
else:
    checkpoint.publish = _slow_publish  # the name checkpoint.py calls it by

train.LAUNCH_MODULE = "tests.dist.slow_commit"  # ranks launched with --nproc-per-node are slowed too

if __name__ == "__main__":
    train.exit_with(train.main())
