"""The middle layer: a chain of calls into client.py."""

import client


def outline(executor, topic):
    return client.ask(executor, "outline", f"Outline {topic}")


def run_pipeline(executor, topic):
    steps = [outline(executor, topic)]
    steps.append(client.ask(executor, "draft", f"Draft {topic}"))
    return steps
