"""Test agent: writes to stderr and exits with the code given as argv[1]."""

import sys

sys.stdin.read()
print("something went wrong in the agent", file=sys.stderr)
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
