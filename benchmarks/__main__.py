"""``python -m benchmarks {kernel,model,decode,compile,export,generation,training,int8,quantization,serving,all} [--quick]``: run, write JSON and plots, print targets."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine

SECTIONS = ("kernel", "model", "decode", "compile", "export", "generation", "training", "int8", "quantization", "serving")


def _export(quick: bool) -> dict[str, Any]:
    from benchmarks import export

    formats = "stablehlo-file" if quick else "stablehlo-file,savedmodel"
    preset, seq, repeats = ("tiny", "64", "2") if quick else ("mlstm-120m", "256", "3")
    with tempfile.TemporaryDirectory() as tmp:
        return export.main(["--preset", preset, "--batches", "1", "--seq-len", seq, "--repeats", repeats,
                            "--formats", formats, "--out", str(Path(tmp) / "export.json")])


MODULES = {"kernel": "kernel", "model": "prefill", "decode": "decode", "compile": "compile_time",
           "generation": "generation", "training": "training", "int8": "int8", "quantization": "quantization",
           "serving": "serving"}
"""The module under ``benchmarks`` whose ``run(quick)`` measures each section but ``export`` (``_export``)."""


def run_section(name: str, quick: bool) -> dict[str, Any]:
    """Run one benchmark section and return its figures."""
    if name == "export":
        return _export(quick)
    return importlib.import_module(f"benchmarks.{MODULES[name]}").run(quick)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m benchmarks``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("section", choices=(*SECTIONS, "all"))
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats: a smoke run of a few minutes")
    p.add_argument("--out", default=str(RESULTS / "bench.json"),
                   help="JSON of every figure; plots go next to it (a single section updates its part of the file)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() and args.section != "all" else {}
    results: dict[str, Any] = previous.get("results", {})
    timings: dict[str, float] = previous.get("section_seconds", {})
    sections = SECTIONS if args.section == "all" else (args.section,)
    for name in sections:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        results[name] = run_section(name, args.quick)
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"   {name} took {timings[name]:.0f} s", flush=True)

    from benchmarks import plots, targets
    from benchmarks.kernel import FLOP_FORMULA

    rows = targets.evaluate(results)
    plot_files = plots.write_all(results, out.parent)
    info = machine()
    doc = {"machine": info, "quick": args.quick, "section_seconds": timings, "flop_formula": FLOP_FORMULA,
           "targets": targets.as_json(rows), "plots": plot_files, "results": results}
    out.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    targets.print_table(rows, f"targets on {info['cpu_model']} ({info['cpu_count']} cores), "
                              f"{'quick smoke run' if args.quick else 'full run'}; ratios from one run")
    print(f"FLOP count: {FLOP_FORMULA}")
    print(f"wrote {out}" + (f" and {', '.join(plot_files)} in {out.parent}" if plot_files else ""))


if __name__ == "__main__":
    main()
