"""An executor class picked from a table: the class itself is followed as a value."""

from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor

FACTORIES = {"offline": TaskExecutor}


def run(kind):
    executor = FACTORIES[kind]([Agent(name="bot", provider="offline")])
    return executor.execute(AgentTask(id="t", prompt="From a table")).output


print(run("offline"))
