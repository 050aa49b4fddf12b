"""Running a plan's tasks on worker processes: RabbitMQ carries the tasks, Redis the results.

Without a broker configured (``TASKEXEC_BROKER_URL`` and ``TASKEXEC_RESULTS_URL``, or
``--broker``/``--results`` on the command line), nothing here is used and every task runs
in-process. See ``docs/DISTRIBUTED.md``.
"""

from ._bus import NetworkBus as NetworkBus
from ._bus import RemoteMessage as RemoteMessage
from ._config import BROKER_ENV_VAR as BROKER_ENV_VAR
from ._config import NAMESPACE_ENV_VAR as NAMESPACE_ENV_VAR
from ._config import RESULTS_ENV_VAR as RESULTS_ENV_VAR
from ._config import Cluster as Cluster
from ._config import redact_url as redact_url
from ._engine import WorkersEngine as WorkersEngine
from ._store import WorkerInfo as WorkerInfo
from ._worker import Worker as Worker

__all__ = (
    "BROKER_ENV_VAR",
    "NAMESPACE_ENV_VAR",
    "RESULTS_ENV_VAR",
    "Cluster",
    "NetworkBus",
    "RemoteMessage",
    "Worker",
    "WorkerInfo",
    "WorkersEngine",
    "redact_url",
)
