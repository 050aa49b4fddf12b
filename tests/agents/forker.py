"""Test agent: starts a grandchild that outlives it, prints its answer and exits 0 at once.

argv[1]: file to write the grandchild's pid to. argv[2]: ``holds-stdout`` (the grandchild keeps
the script's stdout and stderr open), ``detached`` (the grandchild closes them), or ``setsid``
(it keeps them and leaves the script's process group, which only it can do).
"""

import json
import subprocess
import sys

sys.stdin.read()
how = sys.argv[2]
quiet = how == "detached"
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(3600)"],
    stdout=subprocess.DEVNULL if quiet else None,
    stderr=subprocess.DEVNULL if quiet else None,
    start_new_session=how == "setsid",
)
with open(sys.argv[1], "w") as f:
    f.write(f"{child.pid}\n")
print(json.dumps({"output": f"done ({how})"}), flush=True)
