"""A class that stores its executor, built by a function that returns it."""

from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor


def make_executor() -> TaskExecutor:
    # One agent, offline: the replies are a pure function of the prompt.
    return TaskExecutor([Agent(name="writer", provider="offline")])


class Reviewer:
    """Reviews drafts."""

    def __init__(self, executor: TaskExecutor) -> None:
        self.executor = executor
        self.count = 0

    def review(self, draft: str) -> str:
        self.count += 1
        result = self.executor.execute(AgentTask(id=f"r{self.count}", prompt=f"Review: {draft}"))
        return result.output or ""

    def review_all(self, drafts: list[str]) -> list[str]:
        return [self.review(d) for d in drafts]

    def shutdown(self) -> None:
        self.executor.close()


def main() -> None:
    reviewer = Reviewer(make_executor())
    print(reviewer.review("first draft"))
    for line in reviewer.review_all(["intro", "outro"]):
        print(" -", line)
    print("reviews:", reviewer.count)
    reviewer.shutdown()


if __name__ == "__main__":
    main()
