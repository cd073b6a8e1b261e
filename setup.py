"""Package discovery only (everything else is in pyproject.toml).

DESIGN.md puts the services in services/ and the kernels in kernels/ at the repo
root, yet everything imports as `pdmesh.…`: services/ is mapped to the package
`pdmesh.services` and kernels/ to `pdmesh.kernels` with package_dir. pyproject's
static `packages.find` cannot combine discovery with such a mapping, hence this
file; new subpackages anywhere under pdmesh/, services/ or kernels/ are found
without editing it.
"""
from setuptools import find_packages, setup

MAPPED = {"pdmesh.services": "services", "pdmesh.kernels": "kernels"}


def _packages() -> list[str]:
    found = find_packages(include=["pdmesh", "pdmesh.*"])
    for name, folder in MAPPED.items():
        found += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(found)


setup(packages=_packages(), package_dir=dict(MAPPED))
