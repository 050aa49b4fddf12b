"""Test agent: waits until the file in argv[1] exists, then answers ``done``."""

import pathlib
import sys
import time

sys.stdin.read()
while not pathlib.Path(sys.argv[1]).exists():
    time.sleep(0.01)
print("done")
