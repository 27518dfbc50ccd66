"""PNG plots of ``bench.json``: time and memory vs S, throughput vs the matmul roofline, decode latency vs context,
generation (ragged batch and CLI cache), training tokens/s and MFU."""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def time_memory(kernel: dict[str, Any], path: Path) -> Path:
    """Time (fwd, fwd+bwd) and planned peak memory vs S per backend, plus chunkwise memory at the 7B head shape."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    shape = kernel["sweep_shape"]
    for backend in sorted({r["backend"] for r in kernel["sweep"]}):
        rows = [r for r in kernel["sweep"] if r["backend"] == backend]
        for key, style in (("fwd", "-o"), ("fwdbwd", "--s")):
            pts = [(r["S"], r[key]["ms"]) for r in rows if r[key]["ms"] is not None]
            if pts:
                axes[0].plot(*zip(*pts), style, label=f"{backend} {key.replace('fwdbwd', 'fwd+bwd')}")
            mem = [(r["S"], r[key]["memory"]["peak_bytes"] / 2**20) for r in rows if r[key]["memory"]]
            if mem:
                axes[1].plot(*zip(*mem), style, label=f"{backend} {key.replace('fwdbwd', 'fwd+bwd')}")
    axes[0].set(title=f"time, zoo backends (B={shape['B']} NH={shape['NH']} DQK={shape['DQK']} DV={shape['DV']})",
                xlabel="S", ylabel="ms (median)")
    axes[1].set(title="planned peak memory (XLA memory_analysis)", xlabel="S", ylabel="MiB")
    cmp_rows = kernel["compare"]
    for name in cmp_rows[0]["median_s"]:
        if name.startswith("matmul"):
            continue
        pts = [(r["S"], r["median_s"][name] * 1e3) for r in cmp_rows if name in r["median_s"]]
        axes[2].plot(*zip(*pts), "-o", label=name)
    mem = kernel["memory"]
    ax2 = axes[2].twinx()
    ax2.plot([r["S"] for r in mem], [r["peak_bytes"] / 2**30 for r in mem], ":k^", label="zoo fwd+bwd peak (GiB)")
    ax2.set_ylabel("GiB (planned peak, chunkwise fwd+bwd)")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    axes[2].set(title="7B head shape (B=1 NH=8 DQK=256 DV=512): zoo vs torch", xlabel="S", ylabel="ms (median)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax2.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def roofline(kernel: dict[str, Any], path: Path) -> Path:
    """Forward GFLOP/s of zoo chunkwise and torch native_custbw vs the measured float32 matmul rate."""
    plt = _pyplot()
    rows = kernel["compare"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    S = [r["S"] for r in rows]
    ax.plot(S, [r["zoo_fwd_gflops"] for r in rows], "-o", label="zoo chunkwise fwd")
    ax.plot(S, [r["torch_fwd_gflops"] for r in rows], "-s", label="torch native_custbw fwd")
    ax.plot(S, [r["matmul_gflops"] for r in rows], "k--", label="f32 matmul 2048³ (measured, same rounds)")
    ax.plot(S, [0.6 * r["matmul_gflops"] for r in rows], "k:", label="60% of matmul rate (target)")
    ax.plot(S, [r["per_head_matmul_gflops"] for r in rows], "g-.", label="per-head L×DQK×DV matmul (same rounds)")
    ax.set(xscale="log", xlabel="S", ylabel="GFLOP/s", title="throughput vs the matmul roofline (7B head shape)")
    ax.set_xscale("log", base=2)
    ax.text(0.01, 0.01, kernel["flop_formula"], transform=ax.transAxes, fontsize=6.5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def decode_latency(decode: dict[str, Any], path: Path) -> Path:
    """Per-token decode latency vs context length (zoo), with the torch step API at the first context."""
    plt = _pyplot()
    lat = decode["latency_vs_context"]
    row = next(r for r in decode["rows"] if r["name"] == decode["latency_row"])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.plot([x["context"] for x in lat], [x["zoo_ms_per_token"] for x in lat], "-o", label=decode["latency_row"])
    torch = decode["torch"].get(row["preset"])
    if torch:
        ax.plot([decode["context"]], [torch["ms_per_token"]], "rs",
                label=f"torch {torch['api']} (context {decode['context']})")
    ax.axhline(row["roofline_ms_per_step"], color="k", ls="--", label="memory roofline (same run)")
    ax.set(xlabel="context (tokens)", ylabel="ms per token", title="decode latency vs context (B=1)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def generation(gen: dict[str, Any], path: Path) -> Path:
    """Ragged batch vs one prompt at a time (tokens/s beside the bandwidth ceiling), and ``zoo generate`` per cache."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ragged = gen["ragged_batch"]
    names = ("batched", "sequential")
    for i, (key, label) in enumerate((("tokens_per_s", "new tokens / wall s"),
                                      ("decode_tokens_per_s", "decode-only (rows × steps / decode s)"),
                                      ("decode_ceiling_tokens_per_s", "ceiling: batch × bandwidth / bytes per step"))):
        axes[0].bar([j + 0.27 * (i - 1) for j in range(len(names))], [ragged[n][key] for n in names], 0.27,
                    label=label, hatch="//" if "ceiling" in key else None, alpha=0.5 if "ceiling" in key else 1.0)
    axes[0].axhline(ragged["compute_ceiling_tokens_per_s"], color="k", ls="--",
                    label=f"compute ceiling: {ragged['matmul_gflops']:.0f} GFLOP/s / 2 FLOPs per weight")
    axes[0].set_xticks(range(len(names)), [f"{len(ragged['prompt_lengths'])} prompts in one call", "one call per prompt"])
    axes[0].set(yscale="log", ylabel="tokens/s", title=f"ragged batch, {ragged['preset']}, {ragged['new_tokens']} new "
                f"tokens each\n(ceilings measured in the same run: {ragged['bandwidth_gbs']:.0f} GB/s copy)")
    cli = gen["cli"]
    cases = (("cold", "cold cache"), ("second_call", "second call"), ("warm", "warm (median)"), ("off", "no cache"))
    bars = axes[1].bar([label for _, label in cases], [cli[name]["wall_s"] for name, _ in cases])
    for bar, (name, _) in zip(bars, cases):
        axes[1].annotate(f"first step {cli[name]['first_step_ms']:.0f} ms", (bar.get_x() + bar.get_width() / 2,
                         bar.get_height()), ha="center", va="bottom", fontsize=8)
    axes[1].set(ylabel="wall s per process", title="zoo generate on the demo model\n(JAX persistent compilation cache)")
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def training(train: dict[str, Any], path: Path) -> Path:
    """Train-step tokens/s per candidate (bars: medians; dots: rounds), each bar marked with its MFU."""
    plt = _pyplot()
    tokens = train["B"] * train["S"]
    runs = train["seconds_per_step"]
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for x, (name, ts) in enumerate(runs.items()):
        mid, tps = tokens / statistics.median(ts), [tokens / t for t in ts]
        bar = ax.bar(x, mid, 0.6, alpha=0.7)[0]
        ax.plot([x] * len(tps), tps, "k.", label="rounds" if x == 0 else None)
        flops = train["flops_per_token"][name.rsplit(" @", 1)[0]]
        ax.annotate(f"MFU {100 * flops * mid / (train['matmul_gflops'] * 1e9):.0f}%", (x, bar.get_height() / 2),
                    ha="center", fontsize=9)
    ax.set_xticks(range(len(runs)), [n.replace(" fwd+bwd", "\nfwd+bwd") for n in runs], fontsize=8)
    ax.set(ylabel="training tokens/s", title=f"train step, {train['preset']}, B={train['B']} S={train['S']} "
           f"{train['dtype']}\nMFU against the fastest f32 matmul of the same rounds, "
           f"{train['matmul_gflops']:.0f} GFLOP/s")
    ax.text(0.0, -0.24, textwrap.fill(train["flop_formula"], 140), transform=ax.transAxes, fontsize=5.5)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_all(results: dict[str, Any], folder: Path) -> list[str]:
    """Every plot whose data is in ``results``; returns the file names."""
    written = []
    if "kernel" in results:
        written.append(time_memory(results["kernel"], folder / "time_memory_vs_S.png"))
        written.append(roofline(results["kernel"], folder / "throughput_roofline.png"))
    if "decode" in results and results["decode"].get("latency_vs_context"):
        written.append(decode_latency(results["decode"], folder / "decode_latency.png"))
    if "generation" in results:
        written.append(generation(results["generation"], folder / "generation.png"))
    if "training" in results:
        written.append(training(results["training"], folder / "training.png"))
    if "serving" in results:
        from benchmarks import serving

        written.append(serving.plot(results["serving"], folder / "serving.png"))
    return [p.name for p in written]
