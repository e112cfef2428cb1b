import os

# Before Ray is imported: makes Ray use 127.0.0.1 for every address (no other interface is bound).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
