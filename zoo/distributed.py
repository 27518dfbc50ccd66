"""Multi-process start-up: join JAX's distributed runtime when a launcher says there are several processes.

``zoo`` commands call ``initialize_from_env()`` before touching a device. It calls
``jax.distributed.initialize()`` when one of these is set, and does nothing otherwise:

* ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``: for any launcher, e.g. two processes on one machine;
* ``SLURM_NTASKS`` > 1 inside a ``srun`` step: JAX reads the coordinator, process count and id from SLURM;
* ``ZOO_DISTRIBUTED=1``: let JAX detect the cluster itself (TPU pods, Open MPI, Kubernetes).
"""

from __future__ import annotations

import os

import jax


def requested() -> bool:
    """True when the environment describes a multi-process launch."""
    env = os.environ
    if env.get("ZOO_DISTRIBUTED", "") == "1" or env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_ID" in env


def initialize_from_env() -> bool:
    """Join the distributed runtime when ``requested()``; returns whether this process did."""
    if not requested():
        return False
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    count, index = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=None if count is None else int(count),
                               process_id=None if index is None else int(index))
    return True
