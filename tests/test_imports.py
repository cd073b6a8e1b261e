"""The import graph, read statically (grimp): where the files are, layering, no cycles.

pdmesh.services and pdmesh.kernels are the root folders services/ and kernels/ through
the symlinks pdmesh/services and pdmesh/kernels, so a static reader finds them under
pdmesh/ like any subpackage. Layers (lowest first): config and rope < kernels, runtime
< transfer, worker < services; the runtime never imports grpc.
"""
from __future__ import annotations

import grimp
import pytest


@pytest.fixture(scope="module")
def graph():
    # external packages too (as leaves), to see grpc; cache_dir=None: write nothing
    return grimp.build_graph("pdmesh", include_external_packages=True, cache_dir=None)


def _chain(graph, importer: str, imported: str) -> tuple[str, ...] | None:
    """A chain of imports from `importer` (or a module under it) to `imported` (or under)."""
    for package in (importer, imported):
        assert package in graph.modules, f"{package} is not in the static graph"
    return graph.find_shortest_chain(importer=importer, imported=imported, as_packages=True)


def test_services_and_kernels_are_modules_of_the_graph(graph):
    assert "pdmesh.services.gateway.pool" in graph.modules
    assert "pdmesh.kernels.rotary" in graph.modules


def test_kernels_do_not_import_the_runtime(graph):
    assert _chain(graph, "pdmesh.kernels", "pdmesh.runtime") is None


def test_runtime_imports_no_service_and_no_grpc(graph):
    assert _chain(graph, "pdmesh.runtime", "pdmesh.services") is None
    assert _chain(graph, "pdmesh.runtime", "grpc") is None


def test_config_imports_no_service(graph):
    assert _chain(graph, "pdmesh.config", "pdmesh.services") is None


def test_no_cycle_between_the_samplers(graph):
    there = _chain(graph, "pdmesh.runtime.sampler", "pdmesh.runtime.gpu_sampler")
    back = _chain(graph, "pdmesh.runtime.gpu_sampler", "pdmesh.runtime.sampler")
    assert there is None or back is None, (there, back)


def test_routing_names_match_the_gateway():
    """GatewayConfig validates against config's names; the gateway routes by its own."""
    from pdmesh.config import ROUTING_MODES, ROUTING_POLICIES
    from pdmesh.services.gateway import pool, routing

    assert set(routing.POLICIES) == ROUTING_POLICIES
    assert pool.MODES == ROUTING_MODES
