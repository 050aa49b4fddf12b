"""Test agent: reads the task JSON on stdin and answers with a JSON object on stdout."""

import json
import sys

document = json.load(sys.stdin)
print(json.dumps({"output": f"echo {document['agent']}: {document['prompt']}"}))
