"""Nested functions that close over the executor of the function around them."""

from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor


def run(topics):
    executor = TaskExecutor([Agent(name="bot", provider="offline")])

    def one(topic):
        def prompt_for(t):
            return f"Write about {t}"

        return executor.execute(AgentTask(id=topic, prompt=prompt_for(topic))).output

    outputs = [one(t) for t in topics]
    executor.close()
    return outputs


if __name__ == "__main__":
    for output in run(["rivers", "mountains"]):
        print(output)
