"""Test agent: writes its pid, then one word every interval (argv[1] s, default 0.05), flushed.

The words are the task prompt's, so the stream is known in advance; argv[2] (if given) is the exit
status to end with.
"""

import json
import os
import sys
import time

document = json.load(sys.stdin)
interval = float(sys.argv[1]) if len(sys.argv) > 1 else 0.05
status = int(sys.argv[2]) if len(sys.argv) > 2 else 0
sys.stdout.write(f"pid={os.getpid()}")
sys.stdout.flush()
for word in document["prompt"].split():
    time.sleep(interval)
    sys.stdout.write(" " + word)
    sys.stdout.flush()
if status:
    sys.stderr.write("streamer failed on purpose\n")
sys.exit(status)
