"""The lowest layer: one call through the executor it is handed."""

from taskexec import AgentTask


def ask(executor, task_id, prompt):
    return executor.execute(AgentTask(id=task_id, prompt=prompt)).output
