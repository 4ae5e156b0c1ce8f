"""optserve: an optimizer-as-a-server training service.

Import paths: ``optserve.client`` (what trainers use), ``optserve.server`` (the Ray parameter
server), ``optserve.v1`` (the generated gRPC API).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("optserve")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
