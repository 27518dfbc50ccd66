"""Compile the native CPU kernels: ``python -m zoo.kernels.build`` (the Makefile's install rules run it).

The library is ``int8_matmul.cc`` compiled with the C++ compiler on ``PATH`` (``$CXX``, else ``g++``, else
``c++``) against the XLA FFI headers jaxlib ships (``jax.ffi.include_dir()``). No ``-march`` flag: the
source picks AVX2 or AVX-512 at run time, so one build runs on any x86-64 (and the portable loop elsewhere).

Its file name carries a key, a hash of the source, jaxlib's version and the flags: a library built from
another source or for another jaxlib is never loaded, and a changed source is rebuilt rather than reused.
Where it lives, first found wins:

1. ``zoo/kernels/_int8_matmul-KEY.so``, written by this command (gitignored);
2. ``$XDG_CACHE_HOME/xlstm-zoo/kernels/_int8_matmul-KEY.so`` (default ``~/.cache/...``), written by the
   lazy build at first use when (1) is missing (an installed wheel, a checkout whose install step predates
   the kernel, an edited source).

Exit status of the command: 0 when the library was built, or when no compiler is found (the zoo then uses
its pure-JAX path, and says why); 1 when a compiler was found and failed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "int8_matmul.cc"
STEM = "_int8_matmul"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


def compiler() -> str | None:
    """The C++ compiler to use (``$CXX``, ``g++``, ``c++``), or None when there is none on ``PATH``."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def include_dir() -> Path:
    """jaxlib's folder of XLA FFI headers (holds ``xla/ffi/api/ffi.h``)."""
    import jax

    return Path(jax.ffi.include_dir())


def source_key() -> str:
    """16 hex digits naming this source, this jaxlib and these flags: the build a loaded library must match."""
    import jaxlib

    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(f"{jaxlib.__version__}|{platform.machine()}|{' '.join(FLAGS)}".encode())
    return h.hexdigest()[:16]


def library_name(key: str | None = None) -> str:
    """``_int8_matmul-KEY.so``."""
    return f"{STEM}-{key or source_key()}.so"


def cache_dir() -> Path:
    """The per-user folder of lazily built libraries."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xlstm-zoo" / "kernels"


def candidates() -> list[Path]:
    """Where a library of the current key may be, in the order they are tried."""
    name = library_name()
    return [HERE / name, cache_dir() / name]


def build(out_dir: Path, quiet: bool = True) -> Path:
    """Compile the library into ``out_dir`` and return its path.

    Written to a temporary file and renamed, so concurrent builds (pytest workers) never load a half-written
    library. Raises ``RuntimeError`` (one line, with the compiler's first error) when it cannot be built:
    no compiler, no FFI headers, or a failed compile.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler on PATH ($CXX, g++ or c++)")
    inc = include_dir()
    if not (inc / "xla" / "ffi" / "api" / "ffi.h").is_file():
        raise RuntimeError(f"jaxlib ships no XLA FFI headers at {inc}")
    key = source_key()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / library_name(key)
    fd, tmp = tempfile.mkstemp(prefix=f".{STEM}-", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-DZOO_SOURCE_KEY=\"{key}\"", "-isystem", str(inc), str(SOURCE), "-o", tmp]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            first = next((ln for ln in run.stderr.splitlines() if "error" in ln), run.stderr.strip()[:200])
            raise RuntimeError(f"{Path(cxx).name} failed to compile {SOURCE.name}: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not quiet:
        print(" ".join(cmd[:-1] + [str(target)]))
    return target


def remove_stale(out_dir: Path) -> list[Path]:
    """Delete libraries of other keys from ``out_dir``; returns what was deleted."""
    keep = library_name()
    stale = [p for p in out_dir.glob(f"{STEM}-*.so") if p.name != keep]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def main(argv: list[str] | None = None) -> int:
    """``python -m zoo.kernels.build [--out DIR]``: build into the package folder (default) and report."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m zoo.kernels.build", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE, help="folder to write the library into (default: %(default)s)")
    args = p.parse_args(argv)
    if compiler() is None:
        print("zoo.kernels: no C++ compiler on PATH ($CXX, g++ or c++); int8 matmuls use the pure-JAX path")
        return 0
    try:
        path = build(args.out, quiet=False)
    except RuntimeError as e:
        print(f"zoo.kernels: {e}", file=sys.stderr)
        return 1
    remove_stale(args.out)
    print(f"zoo.kernels: built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
