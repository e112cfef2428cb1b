"""`python -m parallel.train` with rank 1 wedged in its second step, so a test sees how the
command line reports a collective that never completes (one line, exit code 3)."""

import os
import sys
import time

from parallel import train
from parallel.trainer import Trainer

_train_step = Trainer.train_step


def _stalling_step(self):  # noqa: ANN001, ANN202
    if self.step == 1 and os.environ.get("RANK") == "1":
        time.sleep(60)  # stops answering, as a wedged GPU would; torchrun ends it once rank 0 failed
    return _train_step(self)


Trainer.train_step = _stalling_step
train.LAUNCH_MODULE = "tests.dist.stall_train"

if __name__ == "__main__":
    sys.exit(train.main())
