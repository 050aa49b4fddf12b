"""with blocks, close(), and an orchestrator that runs tasks with dependencies."""

from taskexec import Agent, AgentTask
from taskexec.sync import ProjectOrchestrator, TaskExecutor

AGENTS = [Agent(name="dev", provider="offline")]


def plan():
    return [
        AgentTask(id="design", prompt="Design it"),
        AgentTask(id="build", prompt="Build it", depends_on=["design"]),
        AgentTask(id="test", prompt="Test it", depends_on=["build"]),
    ]


def run_all():
    executor = TaskExecutor(AGENTS)
    orchestrator = ProjectOrchestrator(executor, max_concurrency=2)
    results = orchestrator.execute_tasks(plan())
    orchestrator.close()
    executor.close()
    return [(r.task_id, r.status.value) for r in results]


def run_one():
    with TaskExecutor(AGENTS) as executor, ProjectOrchestrator(executor) as orchestrator:
        return orchestrator.execute_task(AgentTask(id="solo", prompt="Solo")).output


if __name__ == "__main__":
    print(run_all())
    print(run_one())
