from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor

import framework
import views

framework.path("/answer", views.answer)


def warm_up():
    """A management command: not a view, so it moves to await."""
    with TaskExecutor([Agent(name="ops", provider="offline")]) as executor:
        return executor.execute(AgentTask(id="w", prompt="warm up")).output


if __name__ == "__main__":
    print(warm_up())
    for reply in framework.serve([("/answer", "what is new"), ("/answer", "and now")]):
        print(reply)
