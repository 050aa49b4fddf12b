# A script with no functions: the whole run is module-level code.
from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor

executor = TaskExecutor([Agent(name="bot", provider="offline")])
done = []

# Run each task in turn.
for i in range(3):
    result = executor.execute(AgentTask(id=f"s{i}", prompt=f"Step {i}"))
    done.append(result.task_id)
print(result.output)
executor.close()


def report():
    return f"done: {done}"


print(report())
