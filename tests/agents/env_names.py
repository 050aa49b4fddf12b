"""Test agent: answers with the sorted names (never the values) of its environment variables."""

import json
import os
import sys

json.load(sys.stdin)
print(json.dumps({"output": " ".join(sorted(os.environ))}))
