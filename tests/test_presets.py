"""Every preset's parameter count equals the reference's published table (computed without allocating)."""

from __future__ import annotations

import pytest

import zoo
from zoo import presets

# mlstm-reference.md §7, "Published sizes": (total params, params per block)
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


def test_all_published_sizes_have_presets():
    assert set(PUBLISHED) | {"tiny", "tiny-v1"} == set(presets.names())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_reference_table(name):
    cfg = zoo.load_config(name)
    total, per_block = PUBLISHED[name]
    assert zoo.param_count(cfg) == total
    outside_blocks = 2 * cfg.vocab_size * cfg.embedding_dim + cfg.embedding_dim
    assert (total - outside_blocks) // cfg.num_blocks == per_block


@pytest.mark.parametrize("name", ["tiny", "tiny-v1"])
def test_tiny_presets_are_small_float32(name):
    cfg = zoo.load_config(name)
    assert cfg.dtype == "float32" and cfg.num_blocks <= 4 and cfg.vocab_size <= 1024
    assert zoo.param_count(cfg) < 500_000
