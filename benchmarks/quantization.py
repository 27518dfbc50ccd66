"""Quantisation (issue 20): accuracy and memory of ``int8`` against float32.

* The training demo (``make train-demo``, ``checkpoints/train-demo``): held-out perplexity of int8 vs float32 and
  top-1 next-token agreement, over every held-out position of the run's own split (``zoo.train.data.prepare``
  with the run's ``train_config.json``), for int8 as configured by default (scales per output channel and group
  of 32 input rows), with one scale per output channel (``group_size: null``) and groups of 64, and with the
  embedding quantised too. Measured there (7,763 positions): per-channel 98.92% agreement (perplexity ratio
  1.0005), groups of 128 the same (the demo's K is 64 or 128), of 64 98.93%, of 32 99.18% (1.0004); searching a
  clipping ratio per column or group (MSE-optimal, 0.5..1 in steps of 0.02) picked 1 everywhere and changed
  nothing. float32's top-1 leads its runner-up by under 0.05 nats at 5.1% of positions and by under 0.01 at
  1.2%; the flipped positions are such near-ties (median lead 0.008 nats), so the agreement moves by tens of
  positions between settings (99% = 77 flips here).
* Logit error of int8 vs float32 on random ``mlstm`` and ``mlstm_v1`` models and on a model converted from a
  random PyTorch ``xlstm_large`` (``zoo convert torch``), where it is also compared with PyTorch's own logits.
* ``mlstm_v1-165m``: parameter bytes stored (what a checkpoint holds) and read per decode step at batch 1 (every
  array but the embedding table, of which one row is gathered), int8 vs float32; the full run also writes both
  checkpoints and reports their size on disk.

No region is timed: the figures are errors and bytes. ``python -m benchmarks quantization [--quick]``.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

import zoo
from zoo.model import quantized_weights
from zoo.quantization import quantize, quantized_config, stored_bytes

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "checkpoints" / "train-demo"
VARIANTS = {"int8": {}, "int8 per-channel": {"group_size": None}, "int8 + embedding": {"embedding": True}}
"""The int8 settings measured: the default (projections and head, groups of 32 rows), one scale per output
channel, and the default with the embedding table quantised too."""
DEMO_VARIANTS = {**VARIANTS, "int8 group 64": {"group_size": 64}}
"""On the demo model also groups of 64 rows (its matrices have K = 64 or 128: larger groups are per-channel)."""
PRESET = "mlstm_v1-165m"


def _fmt_mb(n: float) -> str:
    return f"{n / 1e6:8.1f} MB"


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position cross-entropy in nats, in float64: ``logsumexp(logits) - logits[target]``."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    logsumexp = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
    return logsumexp - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def demo_accuracy(quick: bool) -> dict[str, Any]:
    """Held-out perplexity and top-1 agreement of int8 vs float32 on the training demo's model."""
    from zoo.tokenizers import load_codec
    from zoo.train.data import prepare

    if not (DEMO / "train_config.json").is_file():
        return {"skipped": f"{DEMO} is missing: run `make train-demo` first"}
    train = json.loads((DEMO / "train_config.json").read_text())
    config, params = zoo.load(DEMO)
    codec = load_codec(DEMO)
    _, held = prepare(train["data"], codec, train["seq_len"], holdout=train["holdout"], seed=train["seed"],
                      cache_dir=DEMO / "cache")
    rows = len(held) if not quick else min(len(held), 16)
    tokens, borders, mask = (np.asarray(a[:rows]) for a in (held.tokens, held.borders, held.mask))
    counted = mask[:, 1:]
    targets = tokens[:, 1:]

    def logits_of(cfg: Any, p: Any) -> np.ndarray:
        return np.asarray(zoo.forward(cfg, p, tokens[:, :-1], borders[:, :-1]))

    reference = logits_of(config, params)
    ref_nll = _nll(reference, targets)[counted]
    ref_top1 = reference.argmax(-1)[counted]
    top2 = np.sort(reference, axis=-1)[..., -2:]
    margin = (top2[..., 1] - top2[..., 0])[counted]  # how far float32's top-1 leads its runner-up
    result: dict[str, Any] = {"checkpoint": str(DEMO), "positions": int(counted.sum()), "rows": rows,
                              "median_margin": float(np.median(margin)),
                              "margin_below_0.05": float((margin < 0.05).mean()),
                              "float32": {"perplexity": float(np.exp(ref_nll.mean())), "nll": float(ref_nll.mean())}}
    for name, options in DEMO_VARIANTS.items():
        qconfig, qparams = quantize(config, params, "int8", options)
        logits = logits_of(qconfig, qparams)
        nll = _nll(logits, targets)[counted]
        flipped = logits.argmax(-1)[counted] != ref_top1
        result[name] = {
            "perplexity": float(np.exp(nll.mean())),
            "nll": float(nll.mean()),
            "perplexity_ratio": float(np.exp(nll.mean() - ref_nll.mean())),
            "top1_agreement": float(1.0 - flipped.mean()),
            "flipped_median_margin": float(np.median(margin[flipped])) if flipped.any() else None,
            "max_abs_logit_error": float(np.abs(logits - reference).max()),
            "weights_quantised": len(quantized_weights(qconfig)),
        }
    return result


def _logit_error(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    logits, reference = np.asarray(logits, np.float64), np.asarray(reference, np.float64)
    diff = logits - reference
    return {"max_abs": float(np.abs(diff).max()),
            "max_abs_rel": float(np.abs(diff).max() / np.abs(reference).max()),
            "rms_rel": float(np.sqrt((diff ** 2).mean() / (reference ** 2).mean())),
            "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean())}


def random_models(quick: bool) -> dict[str, Any]:
    """Logit error of int8 vs float32 on random float32 ``tiny`` (mlstm) and ``tiny-v1`` (mlstm_v1) models."""
    rows: dict[str, Any] = {}
    shape = (2, 32) if quick else (4, 128)
    for preset in ("tiny", "tiny-v1"):
        config = zoo.load_config({**zoo.load_config(preset).model_dump(mode="json"), "dtype": "float32"})
        params = zoo.init_params(config, seed=0)
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, shape).astype(np.int32)
        reference = np.asarray(zoo.forward(config, params, tokens))
        for name, options in VARIANTS.items():
            qconfig, qparams = quantize(config, params, "int8", options)
            rows[f"{preset} ({config.layer.layer_type}) {name}"] = _logit_error(
                zoo.forward(qconfig, qparams, tokens), reference)
    return rows


def converted_model(quick: bool) -> dict[str, Any]:
    """Logit error of int8 vs float32 (and vs PyTorch) on a zoo model converted from a random xlstm_large."""
    try:
        import torch
        from safetensors.torch import save_file
        from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig
    except ImportError as exc:
        return {"skipped": f"needs torch and xlstm ({exc})"}
    import dataclasses

    import yaml

    from zoo.convert.torch import from_torch

    native = {"chunkwise_kernel": "chunkwise--native_autograd", "sequence_kernel": "native_sequence__native",
              "step_kernel": "native", "mode": "inference", "return_last_states": True,
              "autocast_kernel_dtype": "float32"}
    size = dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=256) if quick else dict(
        embedding_dim=256, num_heads=4, num_blocks=4, vocab_size=2048)
    cfg = xLSTMLargeConfig(**size, **native)
    torch.manual_seed(0)
    model = xLSTMLarge(cfg)
    with torch.no_grad():  # the init leaves some weights at zero or one: make every weight matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 32 if quick else 128))
    with torch.no_grad():
        torch_logits = model(torch.as_tensor(tokens))
    torch_logits = (torch_logits[0] if isinstance(torch_logits, tuple) else torch_logits).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "torch"
        src.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src / "model.safetensors"))
        (src / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
        from_torch(src, Path(tmp) / "zoo", dtype="float32")
        config, params = zoo.load(Path(tmp) / "zoo")
    reference = np.asarray(zoo.forward(config, params, tokens.astype(np.int32)))
    result: dict[str, Any] = {"size": size, "float32 vs torch": _logit_error(reference, torch_logits)}
    for name, options in VARIANTS.items():
        qconfig, qparams = quantize(config, params, "int8", options)
        logits = zoo.forward(qconfig, qparams, tokens.astype(np.int32))
        result[f"{name} vs float32"] = _logit_error(logits, reference)
        result[f"{name} vs torch"] = _logit_error(logits, torch_logits)
    return result


def _decode_bytes(config: Any, shapes: Any) -> int:
    """Parameter bytes one decode step at batch 1 reads: every array but the embedding table, plus one row of it
    (and its scale when quantised)."""
    table = shapes["token_embedding"]["embedding"]
    leaves = jax.tree_util.tree_leaves(table)
    row = sum(int(np.dtype(x.dtype).itemsize) * (config.embedding_dim if x.ndim == 2 else 1) for x in leaves)
    return stored_bytes(shapes) - stored_bytes(table) + row


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def memory(quick: bool) -> dict[str, Any]:
    """Stored and decode-step parameter bytes of ``mlstm_v1-165m``, int8 vs float32; on disk in the full run."""
    config = zoo.load_config(PRESET)
    shapes = zoo.param_shapes(config)
    result: dict[str, Any] = {"preset": PRESET, "params": sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(
        shapes)), "float32": {"stored_bytes": stored_bytes(shapes), "decode_bytes": _decode_bytes(config, shapes)}}
    variants = {name: quantized_config(config, "int8", options) for name, options in VARIANTS.items()}
    for name, qconfig in variants.items():
        qshapes = zoo.param_shapes(qconfig)
        row = {"stored_bytes": stored_bytes(qshapes), "decode_bytes": _decode_bytes(qconfig, qshapes)}
        row["stored_ratio"] = row["stored_bytes"] / result["float32"]["stored_bytes"]
        row["decode_ratio"] = row["decode_bytes"] / result["float32"]["decode_bytes"]
        result[name] = row
    if not quick:
        params = zoo.init_params(config, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            zoo.save(Path(tmp) / "float32", config, params)
            result["float32"]["disk_bytes"] = _disk_bytes(Path(tmp) / "float32")
            for name, options in VARIANTS.items():
                qconfig, qparams = quantize(config, params, "int8", options)
                folder = Path(tmp) / name.replace(" ", "")
                zoo.save(folder, qconfig, qparams)
                result[name]["disk_bytes"] = _disk_bytes(folder)
                result[name]["disk_ratio"] = result[name]["disk_bytes"] / result["float32"]["disk_bytes"]
                del qparams
    return result


def run(quick: bool) -> dict[str, Any]:
    """Every figure of the section, printed as tables; the dict goes into ``bench.json``."""
    results = {"demo": demo_accuracy(quick), "random": random_models(quick), "converted": converted_model(quick),
               "memory": memory(quick)}
    _print(results)
    return results


def _print(results: dict[str, Any]) -> None:
    demo = results["demo"]
    if "skipped" in demo:
        print(f"  demo model: skipped ({demo['skipped']})")
    else:
        print(f"  training demo {demo['checkpoint']}: {demo['positions']} held-out positions ({demo['rows']} rows)")
        print(f"    float32's top-1 leads its runner-up by a median {demo['median_margin']:.3f} nats, by under 0.05 "
              f"at {demo['margin_below_0.05']:.1%} of positions")
        print(f"    {'':18} {'perplexity':>10} {'ratio':>7} {'top-1 agree':>11} {'flips: margin':>13} "
              f"{'max |dlogit|':>12}")
        print(f"    {'float32':18} {demo['float32']['perplexity']:10.3f}")
        for name in DEMO_VARIANTS:
            r = demo[name]
            flips = "-" if r["flipped_median_margin"] is None else f"{r['flipped_median_margin']:.4f}"
            print(f"    {name:18} {r['perplexity']:10.3f} {r['perplexity_ratio']:7.4f} {r['top1_agreement']:11.2%} "
                  f"{flips:>13} {r['max_abs_logit_error']:12.4f}")
    rows = dict(results["random"])
    converted = results["converted"]
    if "skipped" in converted:
        print(f"  converted model: skipped ({converted['skipped']})")
    else:
        rows.update({f"xlstm_large {k}": v for k, v in converted.items() if isinstance(v, dict) and "max_abs" in v})
    print(f"    {'logit error':42} {'max abs':>9} {'max/max|ref|':>12} {'rms rel':>9} {'top-1 agree':>11}")
    for name, r in rows.items():
        print(f"    {name:42} {r['max_abs']:9.4f} {r['max_abs_rel']:12.4%} {r['rms_rel']:9.4%} "
              f"{r['top1_agreement']:11.2%}")
    mem = results["memory"]
    print(f"  {mem['preset']} ({mem['params'] / 1e6:.1f} M params): parameter bytes stored / read per decode step "
          f"(batch 1){' / on disk' if 'disk_bytes' in mem['float32'] else ''}")
    for name in ("float32", *VARIANTS):
        r = mem[name]
        ratios = "" if name == "float32" else (f"  ({r['stored_ratio']:.3f}x / {r['decode_ratio']:.3f}x"
                                               + (f" / {r['disk_ratio']:.3f}x)" if "disk_ratio" in r else ")"))
        disk = f" / {_fmt_mb(r['disk_bytes'])}" if "disk_bytes" in r else ""
        print(f"    {name:18} {_fmt_mb(r['stored_bytes'])} / {_fmt_mb(r['decode_bytes'])}{disk}{ratios}")
