"""The engine seam: how a task runs (in-process, on the rollback engine, on workers).

Kept empty on purpose: the submodules import what they need from each other, so that importing
one part (``base`` from the scheduler) never pulls in the engines built on top of it.

- :mod:`.base`: the work (:class:`~.base.Job`, :class:`~.base.Batch`) and the
  :class:`~.base.Engine` protocol, with its async lifetime.
- :mod:`.registry`: the registry of engines, the :class:`~.registry.EngineSet` an executor owns,
  and :func:`~.registry.select_engine`, the one function that chooses the engine of a call.
- :mod:`.inprocess` and :mod:`.legacy`: the built-in engines. The workers engine lives in
  :mod:`taskexec.distributed` and registers itself when that optional part is loaded.
- :mod:`.entry`: what every entry point (executor, orchestrator, sync shims) calls.
"""
