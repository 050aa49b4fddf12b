from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor

EXECUTOR = TaskExecutor([Agent(name="site", provider="offline")])


def answer(request):
    """A sync view: the framework calls it."""
    return EXECUTOR.execute(AgentTask(id="q", prompt=request["q"])).output
