"""A script-mode agent: reads the task JSON on stdin, writes {"output": ...} on stdout.

taskexec starts it with no shell and sends {"task": ..., "agent": ..., "prompt": ...} on stdin.
Use it as
``Agent(name="echo", mode="script", command=["python", "examples/agents/echo_agent.py"])``.
"""

import json
import sys


def main() -> None:
    document = json.load(sys.stdin)
    task = document["task"]
    first_line = document["prompt"].strip().splitlines()[0] if document["prompt"].strip() else ""
    print(json.dumps({"output": f"{document['agent']} handled {task['id']}: {first_line}"}))


if __name__ == "__main__":
    main()
