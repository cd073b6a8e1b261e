"""Build and load the CPU attention extension (csrc/paged_decode_cpu.cpp) once per machine.

Compiled with the system g++ against the installed torch (`-O3 -march=native`, OpenMP for
at::parallel_for; the .so resolves libgomp.so.1 to the one torch already loaded, so it
shares torch's thread pool) into <cache>/cpu_ext/<key>/, where <cache> is
$PDMESH_CACHE_DIR or ~/.cache/pdmesh and <key> hashes the source, the flags, torch's
version and this CPU's flags: a changed source, another torch or a cache shared with a
different CPU gets its own build. An fcntl lock serialises builders (workers that start
together): the first compiles (~30 s on 2 cores), the rest wait and load its .so.
`python -m pdmesh.runtime.cpu_ext` builds it ahead of time (scripts/install.sh does).
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode_cpu.cpp"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fopenmp",
         "-DNDEBUG", "-Wno-unused-parameter"]


def cache_dir() -> Path:
    """$PDMESH_CACHE_DIR, else ~/.cache/pdmesh."""
    return Path(os.environ.get("PDMESH_CACHE_DIR") or Path.home() / ".cache" / "pdmesh")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build_key() -> str:
    """Hash of everything the compiled .so depends on."""
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (" ".join(FLAGS), torch.__version__, sys.version, _cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _compile(out: Path) -> None:
    from torch.utils.cpp_extension import include_paths

    lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = ["g++", *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           *(f"-I{p}" for p in include_paths()), str(SOURCE), "-o", str(out),
           f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"g++ failed ({res.returncode}): {res.stderr[-2000:]}")


def build() -> Path:
    """Path of the compiled .so, compiling it first unless this machine has it."""
    if shutil.which("g++") is None:
        raise RuntimeError("g++ not found (scripts/install.sh installs it)")
    folder = cache_dir() / "cpu_ext" / build_key()
    so = folder / "pdmesh_cpu_attention.so"
    if so.exists():
        return so
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not so.exists():  # another process may have built it while we waited
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                part = Path(tmp) / so.name
                _compile(part)
                os.replace(part, so)  # atomic: readers never see half a file
    return so


@functools.lru_cache(maxsize=None)
def load() -> bool:
    """Build if needed and load the extension (torch.ops.pdmesh_cpu), once per process;
    False, with one warning line, where that is impossible (no g++, not x86-64 Linux, a
    compile error): callers then keep the torch path."""
    if hasattr(torch.ops.pdmesh_cpu, "paged_decode_attention"):
        return True
    return build_and_load()


def build_and_load() -> bool:
    """load() without its cache: True when the .so was built (or found) and loaded."""
    try:
        if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
            raise RuntimeError(f"built only on x86-64 Linux, not {sys.platform}/{platform.machine()}")
        torch.ops.load_library(str(build()))
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: keep the torch path
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("CPU paged decode attention unavailable, using the torch path: %s", first)
        return False


if __name__ == "__main__":
    print(build())
