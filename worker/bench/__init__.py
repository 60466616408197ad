"""The benchmark (``python -m worker bench``): not part of the worker's runtime.

- :mod:`worker.bench.suite`: the command's options, single runs, sweeps and the reference suite;
- :mod:`worker.bench.load`: driving load (closed and open loop) and collecting replies;
- :mod:`worker.bench.rebalance`: scale events (join, leave, static restart, kill) under load;
- :mod:`worker.bench.targets`: the bench's model repository and the processes it starts;
- :mod:`worker.bench.references`: the echo and plain-loop references;
- :mod:`worker.bench.report`: the table and the plot;
- :mod:`worker.bench.inprocess`: the broker-less, in-process benchmark of ``dev/gpu_check.sh``.
"""

from worker.bench.suite import add_arguments, run

__all__ = ["add_arguments", "run"]
