"""Package discovery for the design card's folders, which map onto import paths (DESIGN §2).

Every package under a root folder is found, not listed: a new room is packaged by existing.
The rest of the project's metadata is in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOTS = {
    "optserve": "protos/optserve",
    "optserve.common": "common",
    "optserve.server": "server",
    "optserve.client": "client",
}

setup(
    package_dir=ROOTS,
    packages=[
        f"{root}.{found}" if found else root
        for root, folder in ROOTS.items()
        for found in ["", *find_packages(folder)]
    ],
)
