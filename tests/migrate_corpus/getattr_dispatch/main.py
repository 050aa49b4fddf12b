"""Methods reached through getattr stay sync, and with them the executor they share."""

from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor


class Commands:
    def __init__(self):
        self.executor = TaskExecutor([Agent(name="cli", provider="offline")])

    def do_greet(self, name):
        return self.executor.execute(AgentTask(id="g", prompt=f"Greet {name}")).output

    def dispatch(self, command, arg):
        return getattr(self, "do_" + command)(arg)


def standalone():
    executor = TaskExecutor([Agent(name="cli", provider="offline")])
    return executor.execute(AgentTask(id="s", prompt="Standalone")).output


commands = Commands()
print(commands.dispatch("greet", "Ada"))
print(standalone())
