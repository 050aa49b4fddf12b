"""Test agent: writes its pid (and its child's) to the file in argv[1], then sleeps for ever.

It starts a grandchild too, so tests can check that the whole process group is stopped.
"""

import subprocess
import sys
import time

sys.stdin.read()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
with open(sys.argv[1], "a") as f:
    f.write(f"{child.pid}\n")
    f.flush()
    import os

    f.write(f"{os.getpid()}\n")
time.sleep(3600)
