"""The Ray layer: placement plans, one actor per rank, a job's ranks as one group.

Ray on this project's machines binds loopback only. Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
when it is imported: set to 0 it makes every address Ray uses, and every server it starts,
127.0.0.1. So it is set here, before any module of ours imports Ray, for a local cluster (no
RAY_ADDRESS) or one on loopback; a real multi-node cluster (RAY_ADDRESS elsewhere) is left alone.
"""

import os

if os.environ.get("RAY_ADDRESS", "127.0.0.1").split("//")[-1].split(":")[0] in ("127.0.0.1", "localhost", "auto"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
