"""`python -m parallel.train` with the checkpoint commit slowed down, so a test can kill
the process while a checkpoint is half written (its shards on disk, not yet committed)."""

import os
import sys
import time

from parallel import checkpoint
from parallel.train import main

_commit = checkpoint.Checkpointer._commit


def _slow_commit(self, step, meta):  # noqa: ANN001, ANN202
    if step >= 4:
        time.sleep(float(os.environ.get("FOURFOLD_TEST_SLOW_COMMIT", "60")))
    return _commit(self, step, meta)


checkpoint.Checkpointer._commit = _slow_commit

if __name__ == "__main__":
    sys.exit(main())
