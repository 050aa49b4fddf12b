"""Test agent: ignores SIGTERM, writes its pid to argv[1], then sleeps (only SIGKILL stops it)."""

import os
import signal
import sys
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.stdin.read()
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()}\n")
time.sleep(3600)
