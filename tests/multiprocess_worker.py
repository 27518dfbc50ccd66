"""One of two processes (4 simulated CPU devices each) running a sharded forward pass and train step.

Started twice by tests/test_sharding.py with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID set, as ``python tests/multiprocess_worker.py CONFIG_JSON TOKENS_NPY OUT_NPZ``; the
zoo joins the runtime itself (``zoo.distributed``). Process 0 writes the gathered results.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import zoo  # noqa: E402
import zoo.train as T  # noqa: E402
from zoo.distributed import initialize_from_env  # noqa: E402


def main(config_path: str, tokens_path: str, out_path: str) -> None:
    assert initialize_from_env()
    config = zoo.load_config(json.loads(open(config_path).read()))
    tokens = np.load(tokens_path)
    params = zoo.init_params(config)  # sharded over both processes' devices
    logits = zoo.forward(config, params, tokens)
    optimizer = T.adamw(config, 1e-3, eps=1e-3)
    state, loss = T.train_step(config, optimizer, T.init_train_state(config, params, optimizer), tokens)
    gathered = multihost_utils.process_allgather({"logits": logits, "params": state.params}, tiled=True)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(gathered)[0]}
        np.savez(out_path, loss=np.asarray(loss), devices=jax.device_count(), processes=jax.process_count(),
                 local=jax.local_device_count(), **flat)


if __name__ == "__main__":
    main(*sys.argv[1:4])
