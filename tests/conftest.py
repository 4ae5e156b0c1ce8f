"""Shared fixtures. Ray starts once per test session, and only for tests that ask for it."""

from __future__ import annotations

import itertools
import os

import pytest

# Must be in the environment before any Ray starts (this process's, and the ones tests spawn).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

_model_ids = itertools.count()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from optserve.server.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def service(ray_session):
    """One optserve server (coordinator actor + gRPC on 127.0.0.1) for the whole session."""
    from optserve.server.runtime import start_service

    svc = start_service(host="127.0.0.1", port=0)
    yield svc
    svc.stop(grace_s=1.0)


@pytest.fixture()
def client(service):
    from optserve.client import ParameterServerClient

    with ParameterServerClient(service.address) as c:
        yield c


@pytest.fixture()
def model_name(request) -> str:
    """A model name unique within the session."""
    base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:80].strip("-")
    return f"{base}-{next(_model_ids)}"
