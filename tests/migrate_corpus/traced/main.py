"""An executor picked from a table: static analysis cannot follow it, a trace can."""

from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor

FACTORIES = {"offline": TaskExecutor}


def run(kind):
    executor = FACTORIES[kind]([Agent(name="bot", provider="offline")])
    return executor.execute(AgentTask(id="t", prompt="Traced")).output


print(run("offline"))
