"""The runner: claims due jobs and runs them in worker processes, in parts that each hold one
concept and start, stop and test alone (see ``runner.runner`` for how they fit together).

| module | holds |
| --- | --- |
| ``pool`` | the worker processes: start, supervise, replace |
| ``producer`` | the claim loop of one queue, into that queue's free slots |
| ``executor`` | one attempt on one process: request, progress, timeout, cancel |
| ``completer`` | the decision for an outcome (``lifecycle.decide``), written until it holds |
| ``leases`` | the attempts this runner holds, and the heartbeat that renews their leases |
| ``writes`` | the runner's writes that arrive together, in one transaction |
| ``maintenance`` | the rescuer, the pruner, the clock sync: timed services |
| ``child``, ``protocol`` | the worker process's body, and what it says over its socket |
| ``runner`` | ``Runner``, the facade the app and the CLI use |

This package's ``__init__`` imports nothing: a worker process loads only ``child``.
"""
