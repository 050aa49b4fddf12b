from taskexec import Agent
from taskexec.sync import TaskExecutor

from pipeline import run_pipeline


def main():
    executor = TaskExecutor([Agent(name="planner", provider="offline")])
    try:
        for step in run_pipeline(executor, "the release notes"):
            print(step)
    finally:
        executor.close()


main()
