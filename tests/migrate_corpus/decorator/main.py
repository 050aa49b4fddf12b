"""A decorated function stays sync; an undecorated one moves."""

import functools

from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor

AGENTS = [Agent(name="bot", provider="offline")]
calls = []


def logged(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        calls.append(func.__name__)
        return func(*args, **kwargs)

    return wrapper


@logged
def summarize(text):
    with TaskExecutor(AGENTS) as executor:
        return executor.execute(AgentTask(id="s", prompt=f"Summarize {text}")).output


def translate(text):
    with TaskExecutor(AGENTS) as executor:
        return executor.execute(AgentTask(id="t", prompt=f"Translate {text}")).output


if __name__ == "__main__":
    print(summarize("the meeting"))
    print(translate("the summary"))
    print(calls)
