"""A sweep worker process: ``python -m vmoe_lib._sweep_worker N`` (started by :mod:`vmoe_lib.sweep`, not by hand).

``python -m vmoe_lib._sweep_worker --torchrun TASK OUTCOME`` is one rank of a ``torchrun`` executor run.

A module of its own so that the worker's classes are pickled as ``vmoe_lib.sweep.*``, never ``__main__.*``.
"""

import sys

from vmoe_lib.sweep import _distributed_task_main, _worker_main

if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--torchrun":  # one rank of a torchrun executor run
        sys.exit(_distributed_task_main(sys.argv[2], sys.argv[3]))
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m vmoe_lib._sweep_worker N  (started by the sweep engine, not by hand)")
    sys.exit(_worker_main(int(sys.argv[1])))
