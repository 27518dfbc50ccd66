"""Every preset's parameter count, in all and per block, equals the published table or a count worked out by
hand from the formulas (docs/numerics.md §7.2-7.3; computed without allocating)."""

from __future__ import annotations

import math

import jax
import pytest

import zoo
from zoo import presets

# docs/numerics.md §7.3, the presets' sizes: (total params, params per block)
PUBLISHED = {
    "mlstm-120m": (120_536_928, 3_605_768),
    "mlstm-165m": (163_806_144, 3_605_768),
    "mlstm-1.3b": (1_422_559_616, 25_344_008),
    "mlstm-7b": (6_889_935_872, 101_216_272),
    "mlstm_v1-165m": (164_073_312, 7_233_800),
    "mlstm_v1-1.3b": (1_420_839_104, 50_616_328),
    "mlstm_v1-2.7b": (2_780_449_600, 78_840_330),
    "mlstm_v1-7b": (6_865_424_896, 201_666_576),
}


# The tiny presets, worked out by hand with the formulas of docs/numerics.md §7.2 (per block, bias=False):
# tiny (mlstm, D=64, Di=round64(2D)=128, K=4, b=4, NH=4):
#   D + 3·D·Di + (K+1)·Di + 3·b·Di + 2·NH·(3·Di+1) + 2·Di = 64 + 24576 + 640 + 1536 + 3080 + 256 = 30152
# tiny-v1 (mlstm_v1, D=64, Dqk_tot=32, Dv_tot=64, NH=4, P=round64(2.667·D)=192):
#   2D + 2·D·Dqk + 2·D·Dv + 2·NH·(D+1) + Dv + Dv·D + 3·D·P
#   = 128 + 4096 + 8192 + 520 + 64 + 4096 + 36864 = 53960
# total = NB·block + 2·V·D + D with NB=2, V=256: 93136 and 140752
BY_HAND = {"tiny": (93_136, 30_152), "tiny-v1": (140_752, 53_960)}


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def test_all_published_sizes_have_presets():
    assert set(PUBLISHED) | set(BY_HAND) == set(presets.names())


@pytest.mark.parametrize("name", sorted(PUBLISHED) + sorted(BY_HAND))
def test_param_count_matches_reference_table(name):
    cfg = zoo.load_config(name)
    total, per_block = {**PUBLISHED, **BY_HAND}[name]
    shapes = zoo.param_shapes(cfg)
    V, D, NB = cfg.vocab_size, cfg.embedding_dim, cfg.num_blocks
    assert count({k: v for k, v in shapes.items() if not k.startswith("blocks")}) == 2 * V * D + D
    if cfg.scan_blocks:  # one stacked block: every leaf has a leading axis of NB
        assert {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(shapes["blocks"])} == {NB}
        assert count(shapes["blocks"]) == NB * per_block
    else:
        assert [count(shapes[f"blocks_{i}"]) for i in range(NB)] == [per_block] * NB
    assert zoo.param_count(cfg) == total


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_tiny_presets_are_small_float32(name):
    cfg = zoo.load_config(name)
    assert cfg.dtype == "float32" and cfg.num_blocks <= 4 and cfg.vocab_size <= 1024
