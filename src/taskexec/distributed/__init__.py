"""Running a plan's tasks on worker processes: RabbitMQ carries the tasks, Redis the results.

Without a broker configured (``TASKEXEC_BROKER_URL`` and ``TASKEXEC_RESULTS_URL``, or
``--broker``/``--results`` on the command line), nothing here is used and every task runs
in-process. See ``docs/DISTRIBUTED.md``.
"""

from .._limits import register_shared_limiter as _register_shared_limiter
from ._bus import NetworkBus as NetworkBus
from ._bus import RemoteMessage as RemoteMessage
from ._config import BROKER_ENV_VAR as BROKER_ENV_VAR
from ._config import NAMESPACE_ENV_VAR as NAMESPACE_ENV_VAR
from ._config import RESULTS_ENV_VAR as RESULTS_ENV_VAR
from ._config import Cluster as Cluster
from ._config import redact_url as redact_url
from ._engine import WorkersEngine as WorkersEngine
from ._engine import register as _register_engine
from ._limits import RedisLimiter as _RedisLimiter
from ._status import cluster_status as cluster_status
from ._store import WorkerInfo as WorkerInfo
from ._worker import MAX_CONCURRENCY as MAX_CONCURRENCY
from ._worker import WORKER_NAME as WORKER_NAME
from ._worker import Worker as Worker

__all__ = (
    "BROKER_ENV_VAR",
    "MAX_CONCURRENCY",
    "NAMESPACE_ENV_VAR",
    "RESULTS_ENV_VAR",
    "WORKER_NAME",
    "Cluster",
    "NetworkBus",
    "RemoteMessage",
    "Worker",
    "WorkerInfo",
    "WorkersEngine",
    "cluster_status",
    "redact_url",
)

# Joining the core: the workers engine and the Redis-shared rate limiter, registered on import.
_register_engine()
_register_shared_limiter(_RedisLimiter)
