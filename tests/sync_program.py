"""A plain sync program using taskexec.sync, run as a real process by tests/test_sync.py.

Usage: python sync_program.py MODE ARGS...
  exit URL            a few llm calls, then a normal interpreter exit
  sleep PIDFILE       one script task that sleeps (the test sends SIGINT)
  fork URL            a call, a fork, a call in the child, a call in the parent
"""

import os
import signal
import sys

from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor

# A program started in the background by a non-interactive shell inherits SIGINT ignored;
# restore the default so Ctrl-C (SIGINT) raises KeyboardInterrupt as in a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)
mode = sys.argv[1]
if mode == "exit":
    agent = Agent(name="gpt", provider="openai", base_url=sys.argv[2])
    executor = TaskExecutor([agent])
    for i in range(5):
        assert executor.execute(AgentTask(id=f"t{i}", prompt="hi")).ok
    print("done", flush=True)
    # No close(): exit must still be clean, with no warnings and no hang.
elif mode == "sleep":
    sleepy = sys.argv[2]
    agent = Agent(name="s", mode="script", command=[sys.executable, sleepy, sys.argv[3]])
    with TaskExecutor([agent]) as executor:
        try:
            executor.execute(AgentTask(id="t", prompt="x"))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            raise
elif mode == "fork":
    agent = Agent(name="gpt", provider="openai", base_url=sys.argv[2])
    executor = TaskExecutor([agent])
    print("parent", executor.execute(AgentTask(id="p", prompt="before fork")).output, flush=True)
    pid = os.fork()
    if pid == 0:
        result = executor.execute(AgentTask(id="c", prompt="in child"))
        print("child", result.output, flush=True)
        executor.close()
        os._exit(0 if result.ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    print("parent", executor.execute(AgentTask(id="p2", prompt="after fork")).output, flush=True)
    executor.close()
