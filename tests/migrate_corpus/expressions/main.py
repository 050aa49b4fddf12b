"""Calls inside expressions: comprehensions, f-strings, conditionals, returns, subscripts."""

from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor

AGENTS = [Agent(name="bot", provider="offline")]
ex = TaskExecutor(AGENTS)


def task(i):
    return AgentTask(id=f"t{i}", prompt=f"Item {i}")


def show(n, short=False):
    outputs = [ex.execute(task(i)).output for i in range(n)]
    print(f"first: {ex.execute(task(0)).output[:20]!r}")
    size = sum(len(ex.execute(task(i)).output) for i in range(n))
    print("size", size, "status", ex.execute(task(1)).status.value)
    print("joined", ",".join(ex.execute(task(i)).output[-6:] for i in range(n)))
    label = "short" if short else ex.execute(task(9)).output
    print(label, {i: ex.execute(task(i)).ok for i in range(n)})
    return outputs[-1] if outputs else ex.execute(task(5)).output


def any_ok(n):
    # any() stops at the first true value: a lazy generator, so this one stays sync.
    own = TaskExecutor(AGENTS)
    return any(own.execute(task(i)).ok for i in range(n))


print(show(2))
print(show(0, short=True))
print("any ok", any_ok(3))
