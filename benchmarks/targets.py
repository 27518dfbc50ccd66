"""The issue's targets, evaluated from the measured figures, and the met/missed table."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.common import fmt_bytes


@dataclass
class Target:
    """One target row: ``ratio`` must be ≥ ``threshold`` (``at_least``) or ≤ it."""

    name: str
    ratio: float
    threshold: float
    at_least: bool
    detail: str

    @property
    def met(self) -> bool:
        """Whether the measured ratio reaches the threshold."""
        return self.ratio >= self.threshold if self.at_least else self.ratio <= self.threshold


def evaluate(results: dict[str, Any]) -> list[Target]:
    """Every target whose section is in ``results``."""
    rows: list[Target] = []
    if "kernel" in results:
        k = results["kernel"]
        c = max(k["compare"], key=lambda r: r["S"])
        m = c["median_s"]
        shape = f"B={c['B']} NH={c['NH']} DQK={c['DQK']} DV={c['DV']} S={c['S']}, zoo L={c['zoo_chunk_size']}"
        rows += [
            Target("kernel fwd vs native_custbw", m["torch native_custbw fwd"] / m["zoo fwd"], 1.5, True,
                   f"{shape}: {m['zoo fwd'] * 1e3:.0f} vs {m['torch native_custbw fwd'] * 1e3:.0f} ms; torch threads "
                   f"{c['torch_threads_chosen']}"),
            Target("kernel fwd+bwd vs native_custbw", m["torch native_custbw fwd+bwd"] / m["zoo fwd+bwd"], 2.0, True,
                   f"{m['zoo fwd+bwd'] * 1e3:.0f} vs {m['torch native_custbw fwd+bwd'] * 1e3:.0f} ms"),
            Target("kernel fwd+bwd vs native_autograd", m["torch native_autograd fwd+bwd"] / m["zoo fwd+bwd"], 3.0,
                   True, f"{m['zoo fwd+bwd'] * 1e3:.0f} vs {m['torch native_autograd fwd+bwd'] * 1e3:.0f} ms"),
            Target("kernel fwd throughput / matmul rate", c["zoo_fwd_gflops"] / c["matmul_gflops"], 0.6, True,
                   f"{c['zoo_fwd_gflops']:.0f} of {c['matmul_gflops']:.0f} GFLOP/s (2048³ f32 matmul, same run); "
                   f"per-head {c['per_head_matmul']}: {c['per_head_matmul_gflops']:.0f} GFLOP/s"),
        ]
        mem = [r for r in k["memory"] if "marginal_bytes_per_token" in r]
        if len(mem) >= 2:
            marg = [r["marginal_bytes_per_token"] for r in mem]
            rows.append(Target("chunkwise fwd+bwd memory linear in S (max/min bytes per token)",
                               max(marg) / min(marg), 1.2, False,
                               f"{fmt_bytes(marg[-1])}/token at S {mem[0]['S']}..{mem[-1]['S']} "
                               f"(peak {fmt_bytes(mem[-1]['peak_bytes'])})"))
    if "model" in results:
        p = results["model"]
        tps = p["tokens_per_s"]
        bound = ""
        if "fraction_of_matmul_rate" in p:  # runs from before the matmul rate was measured beside it have none
            share = p["fraction_of_matmul_rate"]
            bound = (f"; {100 * share['zoo prefill']:.0f}% vs {100 * share['torch xlstm_large prefill']:.0f}% of the "
                     f"{p['matmul_gflops']:.0f} GFLOP/s matmul rate: at most {p['max_ratio_vs_torch']:.2f}x possible")
        rows.append(Target("prefill tokens/s vs torch xlstm_large", tps["zoo prefill"] /
                           tps["torch xlstm_large prefill"], 2.0, True,
                           f"{p['preset']} B={p['B']} S={p['S']} {p['dtype']}: {tps['zoo prefill']:.0f} vs "
                           f"{tps['torch xlstm_large prefill']:.0f} tok/s{bound}"))
    if "decode" in results and "rows" in results["decode"]:
        d = results["decode"]
        for r in (r for r in d["rows"] if r["batch"] == 1):
            detail = (f"context {r['context']}: {r['ms_per_token']:.1f} ms/token (spread {100 * r['spread']:.0f}%), "
                      f"roofline {r['roofline_ms_per_step']:.1f} ms at {r['bandwidth_gbs']:.1f} GB/s; load "
                      f"{d['load_avg_start'][0]:.1f}")
            rows.append(Target(f"decode {r['name']}: fraction of the memory roofline", r["fraction_of_roofline"],
                               0.8, True, detail))
            if r["vs_torch"] is not None:
                t = d["torch"][r["preset"]]
                rows.append(Target(f"decode {r['name']} vs torch {t['api']}", r["vs_torch"], 2.0, True,
                                   f"{r['ms_per_token']:.1f} vs {t['ms_per_token']:.1f} ms/token (torch best at "
                                   f"{t['threads']} threads)"))
            if "vs_float32" in r:
                rows.append(Target(f"decode {r['name']} vs float32 (same run)", r["vs_float32"], 1.5, True,
                                   f"{r['ms_per_token']:.1f} ms/token; roofline of its int8 bytes "
                                   f"{r['roofline_ms_per_step']:.1f} ms"))
        lat = d.get("latency_vs_context")
        if lat:
            rows.append(Target("decode latency flat (last/first context)",
                               lat[-1]["zoo_ms_per_token"] / lat[0]["zoo_ms_per_token"], 1.2, False,
                               ", ".join(f"{x['context']}: {x['zoo_ms_per_token']:.1f} ms" for x in lat)))
    if "compile" in results:
        c = results["compile"]["scan_blocks=True"]
        small, big = c["mlstm_v1-165m"], c["mlstm_v1-1.3b"]
        rows.append(Target("compile forward 1.3B / 165M (scan_blocks)", big["forward_s"] / small["forward_s"], 2.0,
                           False, f"{big['forward_s']:.1f} vs {small['forward_s']:.1f} s (init: {big['init_s']:.1f} "
                                  f"vs {small['init_s']:.1f} s)"))
    if "generation" in results:
        g = results["generation"]["ragged_batch"]
        b, s = g["batched"], g["sequential"]
        rows.append(Target(f"ragged batch of {b['rows_per_call']} vs {s['calls']} sequential calls, decode tokens/s",
                           g["ratio"]["decode_tokens_per_s"], 3.0, True,
                           f"lengths {min(g['prompt_lengths'])}..{max(g['prompt_lengths'])}: {b['decode_tokens_per_s']:.0f}"
                           f" vs {s['decode_tokens_per_s']:.0f} tok/s ({100 * b['fraction_of_ceiling']:.0f}% and "
                           f"{100 * s['fraction_of_ceiling']:.0f}% of the bandwidth ceiling); wall incl. prefill "
                           f"{b['tokens_per_s']:.0f} vs {s['tokens_per_s']:.0f} tok/s"))
        cli = results["generation"]["cli"]
        second, off = cli["second_call"], cli["off"]
        rows.append(Target("zoo generate second call / no cache: prefill + first step",
                           (second["prefill_ms"] + second["first_step_ms"]) / (off["prefill_ms"] + off["first_step_ms"]),
                           0.5, False, f"{second['prefill_ms'] + second['first_step_ms']:.0f} vs "
                           f"{off['prefill_ms'] + off['first_step_ms']:.0f} ms; wall {second['wall_s']:.1f} vs "
                           f"{off['wall_s']:.1f} s per process"))
    if "training" in results:
        t = results["training"]
        zoo_name, torch_name = "zoo train_step", "torch xlstm_large fwd+bwd+AdamW"
        tps, mfu = t["tokens_per_s"], t["mfu"]
        rows.append(Target("training tokens/s vs torch xlstm_large fwd+bwd+AdamW", t["ratio_tokens_per_s"], 1.0, True,
                           f"B={t['B']} S={t['S']} {t['dtype']}: {tps[zoo_name]:.0f} vs {tps[torch_name]:.0f} tok/s; "
                           f"MFU {100 * mfu[zoo_name]:.0f}% vs {100 * mfu[torch_name]:.0f}% of a "
                           f"{t['matmul_gflops']:.0f} GFLOP/s f32 matmul; torch best at "
                           f"{t['torch_threads_chosen'].get(torch_name)}"))
    if "quantization" in results:
        rows += quantization_targets(results["quantization"])
    if "serving" in results:
        from benchmarks import serving

        rows += serving.targets(results["serving"])
    if "export" in results and results["export"]:
        targets = results["export"]["meta"]["targets"]
        for r in results["export"]["results"]:
            if r["format"] != "jax":
                rows.append(Target(f"export {r['format']} time / jitted JAX", r["ratio"], targets[r["format"]], False,
                                   f"B={r['B']} S={r['S']}: {r['median_ms']:.1f} vs {r['jax_median_ms']:.1f} ms"))
    return rows


def quantization_targets(q: dict[str, Any]) -> list[Target]:
    """Issue 20's accuracy and memory targets of int8 (its default, and with the embedding quantised too)."""
    rows = []
    demo = q["demo"]
    if "skipped" not in demo:
        r = demo["int8"]
        rows += [Target("int8 held-out perplexity / float32 (train-demo)", r["perplexity_ratio"], 1.01, False,
                        f"{r['perplexity']:.3f} vs {demo['float32']['perplexity']:.3f} over {demo['positions']} "
                        f"positions"),
                 Target("int8 top-1 next-token agreement with float32 (train-demo)", r["top1_agreement"], 0.99, True,
                        f"{demo['positions']} held-out positions; flips lead by a median "
                        f"{r['flipped_median_margin'] or 0:.3f} nats in float32")]
    mem = q["memory"]
    for name in ("int8", "int8 + embedding"):
        m = mem[name]
        size = "disk" if "disk_ratio" in m else "stored"
        rows += [Target(f"{name} checkpoint {size} bytes / float32 ({mem['preset']})", m.get("disk_ratio",
                                                                                              m["stored_ratio"]),
                        0.3, False, f"{m.get('disk_bytes', m['stored_bytes']) / 1e6:.1f} vs "
                        f"{mem['float32'].get('disk_bytes', mem['float32']['stored_bytes']) / 1e6:.1f} MB"),
                 Target(f"{name} decode-step parameter bytes / float32 ({mem['preset']}, batch 1)",
                        m["decode_ratio"], 0.3, False, f"{m['decode_bytes'] / 1e6:.1f} vs "
                        f"{mem['float32']['decode_bytes'] / 1e6:.1f} MB read per step")]
    return rows


def as_json(rows: list[Target]) -> list[dict[str, Any]]:
    """Rows as plain dicts for ``bench.json``."""
    return [{**asdict(r), "met": r.met} for r in rows]


def print_table(rows: list[Target], title: str) -> None:
    """The rich table of targets, each marked met or missed with its measured ratio."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in ("target", "measured", "needed", "status", "evidence"):
        table.add_column(h, justify="right" if h in ("measured", "needed") else "left")
    for r in rows:
        status = "[green]met[/green]" if r.met else "[red]missed[/red]"
        table.add_row(r.name, f"{r.ratio:.2f}", ("≥ " if r.at_least else "≤ ") + f"{r.threshold:g}", status, r.detail)
    Console(width=200).print(table)
