"""An executor class looked up by name at run time: a trace sees the call, analysis cannot."""

import importlib

from taskexec import Agent, AgentTask


def make(kind):
    module = importlib.import_module("taskexec.sync")
    return getattr(module, kind)([Agent(name="bot", provider="offline")])


def run(kind):
    executor = make(kind)
    return executor.execute(AgentTask(id="t", prompt="Traced")).output


print(run("TaskExecutor"))
