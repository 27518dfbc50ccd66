"""Run sharded forward passes and train steps on 8 simulated CPU devices; print the results as JSON.

Started by tests/test_sharding.py in a subprocess (XLA's device count is fixed at start-up), as
``python tests/sharded_worker.py LAYER_TYPE OUT_DIR [--extras]``. Every mesh is compared with the same
model on one device, computed here on ``jax.devices()[0]``. ``--extras`` adds the sharded init, the
checkpoint restored onto another mesh.
"""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import zoo  # noqa: E402
import zoo.train as T  # noqa: E402
from zoo import sharding  # noqa: E402

FSDP = {"fsdp_modules": ["Embed", "LMHead", "mLSTMBlock"], "fsdp_min_weight_size": 0}
MESHES = {
    "dp8": {"data_axis_size": 8},
    "fsdp8": {"data_axis_size": 1, "fsdp_axis_size": 8, **FSDP},
    "dp2_fsdp2_tp2": {"data_axis_size": 2, "fsdp_axis_size": 2, "model_axis_size": 2, **FSDP},
    "tp4": {"data_axis_size": -1, "model_axis_size": 4},
}
LR = 1e-3


def model_config(layer_type: str) -> dict:
    """A float32 model; ``mlstm``: two blocks under ``nn.scan``; ``mlstm_v1``: one block (unrolled) with an FFN."""
    layer = {"layer_type": layer_type, "num_heads": 4}
    block = {"mlstm": layer}
    if layer_type == "mlstm_v1":
        layer["qk_dim_factor"] = 0.5
        block["feedforward"] = {}
    return {"vocab_size": 128, "embedding_dim": 32, "num_blocks": 2 if layer_type == "mlstm" else 1, "dtype": "float32",
            "scan_blocks": layer_type == "mlstm", "mlstm_block": block}


def perturbed(params):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def collectives(hlo: str) -> dict:
    """Result shapes of every all-gather / all-reduce / reduce-scatter, split by entry vs loop bodies."""
    found: dict = {}
    computation = ""
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            computation = "entry" if head.group(1) else head.group(2)
        op = re.search(r"= \(?(\w+)\[([\d,]*)\].*? (all-gather|all-reduce|reduce-scatter)(-start)?\(", line)
        if op:
            shape = [int(d) for d in op.group(2).split(",") if d]
            found.setdefault(op.group(3), []).append({"dtype": op.group(1), "shape": shape,
                                                      "where": "entry" if computation == "entry" else "nested"})
    return found


def main(layer_type: str, out_dir: str, extras: bool) -> None:
    base = model_config(layer_type)
    single = zoo.load_config(base)
    tokens = np.random.default_rng(0).integers(0, 128, (8, 12)).astype(np.int32)
    params = perturbed(zoo.init_params(single))
    reference = np.asarray(zoo.forward(single, params, tokens))
    optimizer = T.adamw(single, LR, eps=1e-3)
    ref_state, ref_loss = T.train_step(single, optimizer, T.init_train_state(single, copy(params), optimizer), tokens)
    results = {"update": max_diff(ref_state.params, params), "meshes": {}}
    for name, parallel in MESHES.items():
        config = zoo.load_config({**base, "parallel": parallel})
        mesh = sharding.make_mesh(config)
        shardings = sharding.param_shardings(config, mesh)
        sharded = jax.device_put(params, shardings)
        logits = zoo.forward(config, sharded, tokens)
        optimizer = T.adamw(config, LR, eps=1e-3)
        state = T.init_train_state(config, copy(sharded), optimizer)
        compiled = T.lower_step(config, optimizer, state, tokens).compile()
        batch = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, sharding.batch_spec(config)))
        state, loss, _ = compiled(state, batch, None, None)  # (state, tokens, borders, mask) -> (state, loss, grad norm)
        kept = all(a.sharding == b for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                   jax.tree_util.tree_leaves(shardings)))
        specs = {jax.tree_util.keystr(path): [list(a) if isinstance(a, tuple) else a for a in s.spec]
                 for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
        results["meshes"][name] = {
            "mesh": dict(mesh.shape),
            "logits": max_diff(logits, reference), "logits_scale": float(np.abs(reference).max()),
            "loss": abs(float(loss) - float(ref_loss)),
            "params": max_diff(state.params, ref_state.params),
            "rel_params": max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() or 1))
                              for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                              jax.tree_util.tree_leaves(ref_state.params))),
            "layout_kept": kept, "specs": specs,
            "shapes": {jax.tree_util.keystr(p): list(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]},
            "collectives": collectives(compiled.as_text()),
        }
    if not extras:
        print(json.dumps(results))
        return
    # sharded init equals the single-device init; a checkpoint saved on one mesh restores on another
    config = zoo.load_config({**base, "parallel": MESHES["dp2_fsdp2_tp2"]})
    fresh = zoo.init_params(config)
    results["init_equal"] = max_diff(fresh, zoo.init_params(single)) == 0.0
    results["init_sharded"] = all(x.sharding.spec == s.spec for x, s in zip(
        jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(sharding.param_shardings(config, sharding.make_mesh(config)))))
    source = zoo.load_config({**base, "parallel": MESHES["dp2_fsdp2_tp2"]})
    saved = jax.device_put(params, sharding.param_shardings(source, sharding.make_mesh(source)))
    zoo.save(os.path.join(out_dir, "ckpt"), source, saved)  # every device writes its own shards
    target = jax.make_mesh((1, 4, 1, 2), ("dp", "fsdp", "pp", "tp"))
    restored_config, restored = zoo.load(os.path.join(out_dir, "ckpt"), mesh=target,
                                         parallel={"fsdp_modules": FSDP["fsdp_modules"], "fsdp_min_weight_size": 0})
    results["restore"] = {
        "bitwise": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
            jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params))),
        "mesh": dict(jax.tree_util.tree_leaves(restored)[0].sharding.mesh.shape),
        "specs": sorted({str(x.sharding.spec) for x in jax.tree_util.tree_leaves(restored)}),
        "config_parallel": restored_config.parallel.model_dump(),
        "logits": max_diff(zoo.forward(restored_config, restored, tokens), reference),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--extras" in sys.argv[3:])
