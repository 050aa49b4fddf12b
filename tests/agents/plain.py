"""Test agent: prints plain text (not JSON) on stdout."""

import json
import sys

document = json.load(sys.stdin)
print(f"  plain answer to {document['task']['id']}  ")
