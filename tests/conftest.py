"""Shared fixtures. Ray starts once per test session, and only for tests that ask for it."""

from __future__ import annotations

import contextlib
import itertools
import os

import pytest

from optserve.common.auth import TOKEN_ENV
from optserve.server.runtime import keep_ray_on_loopback
from tests.helpers import auth

# Before any `import ray`: this process's Ray, and those of the processes tests spawn.
keep_ray_on_loopback()
# The session's servers check tokens (tests/helpers/auth.py); every client made without an
# explicit token, here and in the processes tests start, sends the admin token.
os.environ[TOKEN_ENV] = auth.ADMIN

_model_ids = itertools.count()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from optserve.server.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def service(ray_session, checkpoint_dir):
    """One optserve server (coordinator actor + gRPC on 127.0.0.1) for the whole session."""
    from optserve.server.runtime import start_service

    svc = start_service(
        host="127.0.0.1",
        port=0,
        checkpoint_dir=checkpoint_dir,
        edge=auth.edge_config(),
        metrics_port=0,  # Prometheus on any free port (tests/integration/test_metrics.py)
    )
    yield svc
    svc.stop(grace_s=1.0)


@pytest.fixture(scope="session")
def second_service(ray_session, checkpoint_dir):
    """Another server on the same Ray and checkpoint directory: a fresh server to restore into."""
    from optserve.server.runtime import start_service

    svc = start_service(
        host="127.0.0.1",
        port=0,
        checkpoint_dir=checkpoint_dir,
        name="optserve-coordinator-2",
        edge=auth.edge_config(),
    )
    yield svc
    svc.stop(grace_s=1.0)


@pytest.fixture()
def client(service):
    from optserve.client import ParameterServerClient

    with ParameterServerClient(service.address) as c:
        yield c


@pytest.fixture()
def model_name(request):
    """A model name unique within the session; the model is dropped after the test.

    Dropping frees the shard actors' worker processes, so the session does not pile them up.
    """
    base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:80].strip("-")
    name = f"{base}-{next(_model_ids)}"
    yield name
    if "service" in request.fixturenames:
        from optserve.client import NotFound, ParameterServerClient

        address = request.getfixturevalue("service").address
        with ParameterServerClient(address) as c, contextlib.suppress(NotFound):
            c.drop_model(name)
