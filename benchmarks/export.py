"""Benchmark exported artifacts (StableHLO, TF SavedModel) against the jitted JAX model: call time on CPU.

Usage (defaults shown)::

    TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/export.py --preset mlstm-120m \
        --dtype float32 --batches 1,8 --seq-len 512 --repeats 5 --warmup 1 \
        --formats stablehlo-file,stablehlo-baked,savedmodel --out benchmarks/results/export.json

The model has the ``--preset``'s shape with every compute dtype (model, layer, cell, LM head, and
``parallel.fsdp_gather_dtype``, which a single device does not use) set to ``--dtype``; params are
``zoo.init_params(cfg, --seed)``. One artifact per format is exported once (entry ``forward``,
``platforms=["cpu"]``, symbolic batch and sequence) into a temporary directory, removed at the end:

* ``jax`` (baseline): ``zoo.forward(cfg, params, tokens)``, the cached ``jax.jit`` function with params as
  arguments, timed with ``jax.block_until_ready``;
* ``stablehlo-file``: ``export_stablehlo(...)`` with its default ``weights="file"``, loaded as the README shows
  (``jax.export.deserialize``; the weights from ``weights.npz``, put on the device once) and called as
  ``jax.jit(exported.call)(weights, tokens)``;
* ``stablehlo-baked``: ``weights="baked"`` (params inlined as constants), called as
  ``jax.jit(exported.call)(tokens)``.  For mlstm-120m float32 this export took ~20 s and ~4.7 GiB peak process
  RSS on a 2-core machine, writing a 480 MB ``forward.jax_exported`` (and, before ``.mlir`` became opt-in, a
  960 MB ``forward.mlir``), so it is benchmarked. It is dropped (the reason is recorded in the JSON) when its
  export exceeds ``--baked-max-export-s`` (120) or grows the process RSS by more than ``--baked-max-gib`` (8);
* ``savedmodel``: ``export_savedmodel(...)``, loaded with ``tf.saved_model.load`` in this same process (TF and
  JAX coexist; each runs its own XLA CPU runtime) and called as
  ``signatures["serving_default"](tokens=<tf.constant made before timing>)["logits"].numpy()``.

For every batch size B (sequence length ``--seq-len``) each runner is first called ``--warmup`` times (compiles
for the shape; the first call's time is reported as "1st call s"), and the warm-up outputs are compared with
JAX's: ``max |out - jax| / max |jax|`` must be below ``--tol`` or the row is flagged and the script exits 1, so a
wrong computation can't be timed silently. Then ``--repeats`` rounds call the runners round-robin (jax,
stablehlo-file, stablehlo-baked, savedmodel, jax, ...), so load from other processes on the machine hits all
of them alike; the ratio is median(artifact) / median(jax) over the same rounds. Targets: StableHLO <= 1.05x,
SavedModel <= 1.3x the JAX time.

On 2 CPU cores a float32 mlstm-120m forward at B=8, S=512 takes ~25 s, so the default run takes ~13 minutes.

``--footprint`` measures only what the default ``zoo export`` costs: a fresh interpreter builds ``--preset`` as
``zoo build`` does (``zoo.init_params(cfg, 0)``, the preset's own dtypes) and calls
``export_stablehlo(cfg, params, DIR)`` with every default (entries forward, prefill, step; platforms cpu, cuda,
tpu; default weights). It records the bytes written per file, the export time, the process's peak RSS
(``ru_maxrss``) after init, and the export's own peak (``VmHWM``, the high-water mark reset after init through
``/proc/self/clear_refs``), under
``default_export_footprint[--label]`` in ``--out`` (the
rest of the file is kept, and a full run keeps this section). ``--zoo-path DIR`` imports ``zoo`` from another
tree, e.g. the code before a change::

    python benchmarks/export.py --footprint --zoo-path /tmp/zoo-base --label before
    python benchmarks/export.py --footprint --label after
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import zoo

if __package__ in (None, ""):  # run as a script: the repository root holds the benchmarks package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import no_compiles, spread  # noqa: E402

GIB = 1024**3
FORMATS = ("stablehlo-file", "stablehlo-baked", "savedmodel")
TARGETS = {"stablehlo-file": 1.05, "stablehlo-baked": 1.05, "savedmodel": 1.3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mlstm-120m", help="config preset (or JSON path) giving the model shape")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype set everywhere in the config (params stay float32)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {', '.join(FORMATS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed round-robin rounds per batch size")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per runner and batch size (compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="largest accepted max|out - jax| / max|jax|")
    p.add_argument("--baked-max-export-s", type=float, default=120.0,
                   help="drop stablehlo-baked when its export takes longer than this")
    p.add_argument("--baked-max-gib", type=float, default=8.0,
                   help="drop stablehlo-baked when its export grows the process RSS by more than this")
    p.add_argument("--out", default="benchmarks/results/export.json")
    p.add_argument("--footprint", action="store_true",
                   help="only measure disk size and peak RSS of the default StableHLO export of --preset")
    p.add_argument("--zoo-path", default=None, help="with --footprint: import zoo from this source tree")
    p.add_argument("--label", default="after", help="with --footprint: the key of this measurement")
    return p.parse_args(argv)


def with_dtype(data, dtype):
    """The dumped config with every compute dtype set to ``dtype`` (inherited copies included).

    ``model_dump`` repeats the model-level ``dtype`` in the layer and cell, and the validator refuses an
    inner value that differs from the outer one, so every copy is replaced, not only the top-level key.
    """
    if isinstance(data, dict):
        return {k: dtype if k in ("dtype", "lm_head_dtype") or (k == "fsdp_gather_dtype" and v is not None)
                else with_dtype(v, dtype) for k, v in data.items()}
    if isinstance(data, list):
        return [with_dtype(v, dtype) for v in data]
    return data


def rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakRSS:
    """Samples the process RSS every 20 ms while active; ``growth`` = peak - RSS at entry."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.growth = self.peak - self.start


def dir_bytes(path):
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(Path(path).rglob("*")) if p.is_file()}


def export_all(cfg, params, formats, root, args):
    """Export each format once; returns ``{name: call(tokens_np) -> output}`` and per-format export info."""
    runners, info = {}, {}
    for name in formats:
        out_dir = Path(root) / name
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            if name.startswith("stablehlo"):
                from zoo.export.stablehlo import export_stablehlo

                weights = name.split("-")[1]
                export_stablehlo(cfg, params, out_dir, platforms=["cpu"], entries=["forward"], weights=weights)
            else:
                from zoo.export.savedmodel import export_savedmodel

                export_savedmodel(cfg, params, out_dir, platforms=["cpu"], entries=["forward"])
        export_s = time.perf_counter() - t0
        files = dir_bytes(out_dir)
        rec = {"export_s": round(export_s, 2), "export_rss_growth_bytes": mem.growth,
               "process_rss_peak_bytes": mem.peak, "artifact_bytes": sum(files.values()), "files": files}
        print(f"  exported {name:20s} in {export_s:6.1f} s, artifact {sum(files.values()) / 2**20:8.1f} MiB, "
              f"RSS +{mem.growth / GIB:.2f} GiB", flush=True)
        if name == "stablehlo-baked":
            why = []
            if export_s > args.baked_max_export_s:
                why.append(f"export took {export_s:.0f} s > {args.baked_max_export_s:.0f} s")
            if mem.growth > args.baked_max_gib * GIB:
                why.append(f"export grew RSS by {mem.growth / GIB:.1f} GiB > {args.baked_max_gib} GiB")
            if why:
                rec["skipped"] = "; ".join(why)
                info[name] = rec
                print(f"  skipping {name}: {rec['skipped']}", flush=True)
                continue
        t0 = time.perf_counter()
        if name.startswith("stablehlo"):
            exported = jax.export.deserialize((out_dir / "forward.jax_exported").read_bytes())
            call = jax.jit(exported.call)
            if name == "stablehlo-file":
                manifest = json.loads((out_dir / "manifest.json").read_text())
                with np.load(out_dir / "weights.npz") as npz:
                    weights = jax.device_put({p["name"]: npz[p["name"]].view(p["dtype"])
                                              for p in manifest["weights_file"]["params"]})
                runners[name] = lambda tok, call=call, w=weights: jax.block_until_ready(call(w, tok["jax"]))
            else:
                runners[name] = lambda tok, call=call: jax.block_until_ready(call(tok["jax"]))
        else:
            import tensorflow as tf

            loaded = tf.saved_model.load(str(out_dir))
            sig = loaded.signatures["serving_default"]
            runners[name] = lambda tok, sig=sig, loaded=loaded: sig(tokens=tok["tf"])["logits"].numpy()
        rec["load_s"] = round(time.perf_counter() - t0, 2)
        info[name] = rec
    return runners, info


FOOTPRINT = r"""
import json, resource, sys, time
from pathlib import Path

import jax
import zoo
from zoo.export.stablehlo import export_stablehlo

preset, out = sys.argv[1:3]
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
# VmHWM: the address space's RSS high-water mark, which writing 5 to clear_refs resets to the current RSS.
# (ru_maxrss also keeps the marks of exited threads, so a reset does not always show there.)
hwm = lambda: int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
cfg = zoo.load_config(preset)
params = jax.block_until_ready(zoo.init_params(cfg, 0))
after_init = peak()
Path("/proc/self/clear_refs").write_text("5")
at_start = hwm()
t0 = time.perf_counter()
export_stablehlo(cfg, params, out)
export_s = time.perf_counter() - t0
during = hwm()
files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(Path(out).rglob("*")) if p.is_file()}
print(json.dumps({"zoo_file": zoo.__file__, "param_count": zoo.param_count(cfg), "export_s": round(export_s, 1),
                  "peak_rss_after_init_bytes": after_init, "rss_at_export_start_bytes": at_start,
                  "peak_rss_during_export_bytes": during, "peak_rss_bytes": max(after_init, during, peak()),
                  "artifact_bytes": sum(files.values()), "files": files}))
"""


def footprint(preset, zoo_path=None):
    """Disk size and peak RSS of ``export_stablehlo(cfg, params, DIR)`` with every default, in a fresh process."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if zoo_path:
        env["PYTHONPATH"] = str(Path(zoo_path).resolve())
    with tempfile.TemporaryDirectory(prefix="zoo-export-footprint-") as root:
        proc = subprocess.run([sys.executable, "-c", FOOTPRINT, preset, str(Path(root) / "artifact")], env=env,
                              cwd=root, capture_output=True, text=True)  # cwd: `-c` puts it first on sys.path
    if proc.returncode != 0:
        sys.exit(f"footprint run failed:\n{proc.stderr[-3000:]}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["export_rss_growth_bytes"] = record["peak_rss_during_export_bytes"] - record["rss_at_export_start_bytes"]
    # export_s is the whole export, tracing and lowering included: a size and memory record, not a speed figure
    record.update(preset=preset, date=_dt.datetime.now().isoformat(timespec="seconds"),
                  load_average_1_5_15_min=[round(x, 2) for x in os.getloadavg()],
                  method="fresh interpreter: zoo.init_params(load_config(preset), 0), then export_stablehlo with "
                         "every default; process peak RSS = resource.getrusage(RUSAGE_SELF).ru_maxrss; the export's "
                         "own peak = VmHWM of /proc/self/status, reset after init (5 > /proc/self/clear_refs)")
    print(f"{preset} default stablehlo export: {record['artifact_bytes'] / 1e9:.2f} GB on disk; RSS "
          f"{record['rss_at_export_start_bytes'] / GIB:.2f} GiB at its start, peak "
          f"{record['peak_rss_during_export_bytes'] / GIB:.2f} GiB during it; process peak "
          f"{record['peak_rss_bytes'] / GIB:.2f} GiB ({record['peak_rss_after_init_bytes'] / GIB:.2f} GiB after init); "
          f"{record['export_s']:.0f} s; zoo from {record['zoo_file']}", flush=True)
    return record


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if out.shape != ref.shape:
        return float("inf")
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def bench_batch(B, S, cfg, params, runners, args):
    tokens = np.random.default_rng(args.seed + B).integers(0, cfg.vocab_size, (B, S)).astype(np.int32)
    tok = {"jax": jnp.asarray(tokens)}
    if "savedmodel" in runners:
        import tensorflow as tf

        tok["tf"] = tf.constant(tokens)
    calls = {"jax": lambda t: jax.block_until_ready(zoo.forward(cfg, params, t["jax"])), **runners}
    res = {name: {"first_call_s": None, "all_ms": [], "max_rel_err": None} for name in calls}

    ref = None
    for name, call in calls.items():  # warm-up: compile, then check the output against JAX's
        for w in range(args.warmup):
            t0 = time.perf_counter()
            out = call(tok)
            if w == 0:
                res[name]["first_call_s"] = round(time.perf_counter() - t0, 2)
        if name == "jax":
            ref = np.asarray(out)
        else:
            res[name]["max_rel_err"] = rel_err(out, ref)
        del out
        err = res[name]["max_rel_err"]
        print(f"  B={B} warm-up {name:20s} first call {res[name]['first_call_s']:7.2f} s"
              + ("" if err is None else f", max rel err vs jax {err:.2e}"), flush=True)
    del ref

    with no_compiles(f"the export rounds at B={B}"):  # JAX's compiles; a SavedModel runs a traced TF graph
        for r in range(args.repeats):  # round-robin, so background load hits every runner alike
            line = []
            for name, call in calls.items():
                t0 = time.perf_counter()
                call(tok)
                ms = (time.perf_counter() - t0) * 1e3
                res[name]["all_ms"].append(ms)
                line.append(f"{name} {fmt_ms(ms)}")
            print(f"  B={B} round {r + 1}/{args.repeats}: " + ", ".join(line) + " ms", flush=True)

    rows = []
    jax_ms = statistics.median(res["jax"]["all_ms"])
    for name, r in res.items():
        ms = statistics.median(r["all_ms"])
        row = {"B": B, "S": S, "format": name, "median_ms": ms, "spread": spread(r["all_ms"]), "jax_median_ms": jax_ms,
               **r}
        if name != "jax":
            ratio = ms / jax_ms
            correct = r["max_rel_err"] <= args.tol
            row.update(ratio=ratio, target=TARGETS[name], correct=correct,
                       met=bool(correct and ratio <= TARGETS[name]))
        rows.append(row)
    return rows


def fmt_ms(x):
    if x is None:
        return "-"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def print_table(rows, info, meta):
    headers = ["B", "S", "format", "export s", "1st call s", "median ms", "spread", "jax ms", "ratio", "target", "met",
               "max rel err"]
    body = []
    for r in rows:
        jax_row = r["format"] == "jax"
        body.append([str(r["B"]), str(r["S"]), r["format"],
                     "-" if jax_row else f"{info[r['format']]['export_s']:.1f}",
                     f"{r['first_call_s']:.1f}", fmt_ms(r["median_ms"]), f"{100 * r['spread']:.0f}%",
                     fmt_ms(r["jax_median_ms"]),
                     "1.00" if jax_row else f"{r['ratio']:.3f}",
                     "-" if jax_row else f"<= {r['target']:.2f}",
                     "-" if jax_row else ("yes" if r["met"] else ("WRONG OUTPUT" if not r["correct"] else "no")),
                     "-" if jax_row else f"{r['max_rel_err']:.1e}"])
    title = (f"{meta['preset']} {meta['dtype']} forward on {meta['device']} ({meta['cpu_count']} cores) | "
             f"median of {meta['repeats']} interleaved rounds | load average {meta['load_avg_start'][0]:.2f} at start, "
             f"{meta['load_avg_end'][0]:.2f} at end")
    notes = [f"ratio = median(format) / median(jax) from the same rounds; max rel err = max|out - jax| / max|jax| "
             f"(tolerance {meta['tol']:g})"]
    notes += [f"{name} not benchmarked: {rec['skipped']}" for name, rec in info.items() if "skipped" in rec]
    try:
        from rich.console import Console
        from rich.table import Table

        console = Console(width=150)
        table = Table(title=title)
        for j, h in enumerate(headers):
            table.add_column(h, justify="left" if h == "format" else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)
        for n in notes:
            console.print(n)
    except ImportError:  # plain text
        widths = [max(len(h), *(len(row[j]) for row in body)) for j, h in enumerate(headers)]
        print(title)
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        for row in body:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        print("\n".join(notes))


def versions():
    out = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__}
    try:
        import jaxlib

        out["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    try:
        import tensorflow as tf

        out["tensorflow"] = tf.__version__
    except ImportError:
        pass
    out["zoo"] = zoo.__version__
    return out


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def mem_total_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if args.footprint:
        kept = previous.get("default_export_footprint", {})
        previous["default_export_footprint"] = {**kept, args.label: footprint(args.preset, args.zoo_path)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(previous, indent=2) + "\n")
        print(f"wrote {out}")
        return previous
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        sys.exit(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")

    base = zoo.load_config(args.preset)
    cfg = zoo.load_config(with_dtype(base.model_dump(mode="json"), args.dtype))
    dev = jax.devices()[0]
    meta = {
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}".rstrip(":"),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "mem_total_bytes": mem_total_bytes(),
        "platform": platform.platform(), "versions": versions(),
        "env": {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")},
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "load_avg_start": list(os.getloadavg()),
        "preset": args.preset, "dtype": args.dtype, "param_count": zoo.param_count(cfg), "seed": args.seed,
        "entry": "forward", "batches": batches, "seq_len": args.seq_len, "repeats": args.repeats,
        "warmup": args.warmup, "tol": args.tol, "formats": formats, "targets": TARGETS,
        "config": json.loads(cfg.model_dump_json()),
        "method": "runners called round-robin (jax first) in each of `repeats` rounds after `warmup` untimed calls; "
                  "ratio = median(format ms) / median(jax ms) of the same rounds; jax and stablehlo timed with "
                  "jax.block_until_ready, savedmodel with .numpy() on the logits; TF SavedModel loaded in the same "
                  "process as JAX",
    }
    print(f"{args.preset} {args.dtype}: {meta['param_count'] / 1e6:.1f} M params; init ...", flush=True)
    t0 = time.perf_counter()
    params = jax.block_until_ready(zoo.init_params(cfg, args.seed))
    meta["init_s"] = round(time.perf_counter() - t0, 2)

    rows = []
    with tempfile.TemporaryDirectory(prefix="zoo-export-bench-") as root:
        runners, info = export_all(cfg, params, formats, root, args)
        for B in batches:
            t0 = time.perf_counter()
            rows += bench_batch(B, args.seq_len, cfg, params, runners, args)
            print(f"  B={B} done in {time.perf_counter() - t0:.1f} s", flush=True)
        runners.clear()
    meta["load_avg_end"] = list(os.getloadavg())
    meta["total_s"] = round(time.perf_counter() - t_start, 1)

    print_table(rows, info, meta)
    print(f"total {meta['total_s']:.0f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "exports": info, "results": rows}
    if "default_export_footprint" in previous:
        result["default_export_footprint"] = previous["default_export_footprint"]
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    wrong = [f"{r['format']} B={r['B']}" for r in rows if r.get("correct") is False]
    if wrong:
        sys.exit(f"outputs differ from JAX beyond --tol {args.tol:g}: {', '.join(wrong)}")
    return result


if __name__ == "__main__":
    main()
