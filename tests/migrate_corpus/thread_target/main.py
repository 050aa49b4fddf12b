"""A thread target keeps its own sync executor; the main path moves to await."""

import threading

from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor

AGENTS = [Agent(name="bot", provider="offline")]
results: list[str] = []


def background(prompt: str) -> None:
    # Runs on a thread: the sync API is right here.
    executor = TaskExecutor(AGENTS)
    results.append(executor.execute(AgentTask(id="bg", prompt=prompt)).output or "")
    executor.close()


def foreground(prompt: str) -> str:
    executor = TaskExecutor(AGENTS)
    output = executor.execute(AgentTask(id="fg", prompt=prompt)).output
    executor.close()
    return output or ""


def main() -> None:
    worker = threading.Thread(target=background, args=("in the background",))
    worker.start()
    worker.join()
    print(foreground("in the foreground"))
    print(results[0])


if __name__ == "__main__":
    main()
