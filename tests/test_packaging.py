"""Without the Mooncake transfer engine (or its libibverbs), the commands that need it
fail at once with one line naming the install command, exit code 2, and nothing started.

The missing pieces are simulated in each child process by a sitecustomize on PYTHONPATH
that makes `import mooncake` (not installed) or `import mooncake.engine` (the extension
cannot load libibverbs.so.1) raise as they do on such a machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

NOT_INSTALLED = ("pdmesh: the Mooncake transfer engine is not installed: pip install "
                 "mooncake-transfer-engine-non-cuda (CPU) or mooncake-transfer-engine-cuda13 "
                 "(CUDA 13), and apt-get install libibverbs1")
NO_VERBS = ("pdmesh: the Mooncake transfer engine cannot load libibverbs (the RDMA verbs "
            "library, needed even for tcp): apt-get install libibverbs1 (libibverbs.so.1: "
            "cannot open shared object file: No such file or directory)")

SITECUSTOMIZE = '''
import os, sys

class _HideMooncake:
    """PDMESH_TEST_MOONCAKE=missing: no mooncake at all; =no-verbs: mooncake.engine's
    extension cannot load libibverbs.so.1 (the package itself imports)."""

    def find_spec(self, name, path=None, target=None):
        how = os.environ.get("PDMESH_TEST_MOONCAKE")
        if how == "missing" and name.split(".")[0] == "mooncake":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        if how == "no-verbs" and name == "mooncake.engine":
            raise ImportError("libibverbs.so.1: cannot open shared object file: "
                              "No such file or directory")
        return None

sys.meta_path.insert(0, _HideMooncake())
'''


@pytest.fixture(scope="module")
def hide_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hide_mooncake")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


def without_mooncake(hide_dir, how: str) -> dict[str, str]:
    """Environment for a child where mooncake is `how` ("missing" or "no-verbs")."""
    path = os.pathsep.join(p for p in (str(hide_dir), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PDMESH_TEST_MOONCAKE=how, OMP_NUM_THREADS="1")


def pdmesh(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdmesh.cli", *argv], env=env, text=True,
                          capture_output=True, timeout=60)


@pytest.mark.parametrize("how, line", [("missing", NOT_INSTALLED), ("no-verbs", NO_VERBS)])
@pytest.mark.parametrize("argv", [
    ("prefill", "--registry", "127.0.0.1:9", "--port", "0"),
    ("decode", "--registry", "127.0.0.1:9", "--port", "0"),
    ("serve", "--prefill", "1", "--decode", "1", "--port", "0", "--grpc-port", "0"),
], ids=["prefill", "decode", "serve"])
def test_command_without_mooncake_is_one_line_and_exit_2(hide_dir, how, line, argv):
    t0 = time.monotonic()
    res = pdmesh(without_mooncake(hide_dir, how), *argv)
    assert (res.returncode, res.stderr.splitlines()) == (2, [line]), res.stderr
    assert res.stdout == ""  # serve started no child (each would echo "[name] ..." lines)
    assert time.monotonic() - t0 < 30  # before any model is loaded


def test_the_transport_factory_raises_the_same_line(hide_dir):
    code = ("from pdmesh.transfer import MooncakeUnavailable, check_transport, get_transport\n"
            "factory = get_transport('mooncake')  # lazy: resolving it imports no engine\n"
            "for f in (lambda: check_transport('mooncake'), lambda: factory(hostname='h')):\n"
            "    try:\n"
            "        f()\n"
            "    except MooncakeUnavailable as e:\n"
            "        print('pdmesh:', e)\n")
    for how, line in (("missing", NOT_INSTALLED), ("no-verbs", NO_VERBS)):
        res = subprocess.run([sys.executable, "-c", code], env=without_mooncake(hide_dir, how),
                             text=True, capture_output=True, timeout=60)
        assert res.stdout.splitlines() == [line, line], res.stderr


def test_the_check_passes_where_mooncake_is_installed():
    from pdmesh.transfer import check_transport

    pytest.importorskip("mooncake.engine")
    check_transport("mooncake")
