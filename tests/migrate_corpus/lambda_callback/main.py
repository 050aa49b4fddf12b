"""A lambda cannot await: the executor it uses stays sync, another one moves."""

from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor

AGENTS = [Agent(name="bot", provider="offline")]


def shout(prompt):
    executor = TaskExecutor(AGENTS)
    label = lambda p: executor.execute(AgentTask(id="l", prompt=p)).output.upper()  # noqa: E731
    return label(prompt)


def whisper(prompt):
    executor = TaskExecutor(AGENTS)
    return executor.execute(AgentTask(id="w", prompt=prompt)).output.lower()


print(shout("Hello"))
print(whisper("Hello"))
