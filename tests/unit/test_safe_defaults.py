"""Safe by default off loopback (issue 17): what `optserve serve` refuses before it starts
anything, where the embedded Ray goes, the hint for Ray's token authentication, and the metrics
endpoint's token and scrape cache. No Ray is started: `ray.init` is replaced where reached."""

from __future__ import annotations

import hashlib
import json

import pytest
import ray
from prometheus_client.metrics_core import GaugeMetricFamily

from optserve.server import runtime
from optserve.server.cli import build_parser
from optserve.server.cli.safety import check_exposure, exposure_problems, placeholder_names
from optserve.server.metrics import CoordinatorMetrics
from optserve.server.metrics.endpoint import ScrapeCache, token_sha256
from tests.helpers import auth
from tests.helpers.http_get import get


class Started(Exception):
    """Raised by the stand-in `ray.init`: serve got as far as starting Ray."""


@pytest.fixture()
def ray_init(monkeypatch):
    """Replace `ray.init` (and make this process look Ray-less) to see what serve starts."""
    calls: list[dict] = []

    def init(**kwargs):
        calls.append(kwargs)
        raise Started

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setenv("OPTSERVE_TOKENS", auth.TOKENS_JSON)
    monkeypatch.delenv("OPTSERVE_TOKENS_FILE", raising=False)
    return calls


def serve(*argv: str):
    args = build_parser().parse_args(["serve", *argv])
    return args.func(args)


@pytest.mark.parametrize(
    ("argv", "needs"),
    [
        (["--host", "0.0.0.0"], "--tls-cert"),
        (["--host", "10.1.2.3"], "--tls-cert"),
        (["--host", "::"], "--tls-cert"),
        (["--host", "0.0.0.0", "--no-auth"], "--no-auth"),
    ],
)
def test_serve_off_loopback_unprotected_refuses_before_starting_anything(
    ray_init, monkeypatch, argv, needs
):
    if "--no-auth" in argv:
        monkeypatch.delenv("OPTSERVE_TOKENS")
    with pytest.raises(SystemExit) as refused:
        serve(*argv)
    message = str(refused.value.code)  # a string: the process exits with status 1
    assert "refusing to start off loopback" in message and needs in message
    assert "--insecure" in message
    assert ray_init == []  # Ray was never started


def test_loopback_is_unchanged_and_insecure_allows_with_a_warning(ray_init, capsys):
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert exposure_problems(host, tls=False, auth=False) == [], host
    assert len(exposure_problems("0.0.0.0", tls=False, auth=False)) == 2
    assert exposure_problems("0.0.0.0", tls=True, auth=True) == []
    assert check_exposure("10.0.0.1", tls=False, auth=True, insecure=True)[0].startswith(
        "WARNING (--insecure)"
    )
    # On loopback, without TLS: serve goes on to start its (embedded, loopback) Ray.
    with pytest.raises(Started):
        serve("--port", "0")
    assert ray_init[-1]["_node_ip_address"] == "127.0.0.1"


def test_the_embedded_ray_stays_on_loopback_whatever_host_is(ray_init, capsys):
    with pytest.raises(Started):
        serve("--host", "0.0.0.0", "--insecure")
    (init,) = ray_init
    assert init["address"] == "local" and init["_node_ip_address"] == "127.0.0.1"
    assert init["include_dashboard"] is False
    out, err = capsys.readouterr()
    assert "WARNING (--insecure)" in err and "without TLS" in err
    # The wildcard is replaced by the machine's address, which the shards then advertise.
    assert "the embedded Ray stays on 127.0.0.1; serving on " in out


def test_placeholder_tokens_are_refused_at_start(ray_init, monkeypatch):
    table = {"tokens": [
        {"name": "ops", "role": "admin", "token": "REPLACE-WITH-32-RANDOM-CHARACTERS"},
        {"name": "mine", "role": "admin", "token": "Zq3rT9-xV2mL8wK4pN7sB1yH6cF0dJ5a"},
        {"name": "lazy", "role": "trainer", "token": "x" * 32},
        {"name": "digest", "role": "trainer",
         "sha256": hashlib.sha256(b"REPLACE-WITH-ANOTHER-32-CHARACTERS").hexdigest()},
        {"name": "typed", "role": "trainer", "token": "changeme-changeme-changeme"},
    ]}  # fmt: skip
    assert placeholder_names(json.dumps(table)) == ["ops", "lazy", "digest", "typed"]
    assert placeholder_names(auth.TOKENS_JSON) == []
    monkeypatch.setenv("OPTSERVE_TOKENS", json.dumps(table))
    with pytest.raises(SystemExit) as refused:
        serve("--port", "0")
    assert "placeholder tokens" in str(refused.value.code)
    assert "ops, lazy, digest, typed" in str(refused.value.code)
    assert ray_init == []


def test_a_missing_ray_token_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    bare = ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")
    hint = runtime.explain_ray_connect_error(bare, {})
    assert "RAY_AUTH_MODE=token" in hint and "RAY_AUTH_TOKEN_PATH" in hint
    assert "10.0.0.5:6379" in hint and "ray get-auth-token" in hint
    hint = runtime.explain_ray_connect_error(bare, {"RAY_AUTH_MODE": "token"})
    assert "no token was found" in hint and "RAY_AUTH_TOKEN_PATH" in hint
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/etc/ray/auth_token"}
    assert "is the cluster's" in runtime.explain_ray_connect_error(bare, env)
    other = runtime.explain_ray_connect_error(ValueError("bad address 'x'"), {})
    assert "RAY_AUTH_MODE" not in other and "bad address" in other

    # Through connect_ray and serve: the hint is printed and serve exits 1.
    def refused(**kwargs):
        raise bare

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(runtime.RayConnectError, match="RAY_AUTH_MODE=token"):
        runtime.connect_ray("10.0.0.5:6379")
    monkeypatch.setenv("OPTSERVE_TOKENS", auth.TOKENS_JSON)
    assert serve("--ray-address", "10.0.0.5:6379") == 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def family(value: float) -> list:
    gauge = GaugeMetricFamily("optserve_test_gauge", "a shard's series")
    gauge.add_metric([], value)
    return [gauge]


def test_scrapes_within_a_second_share_one_fan_out():
    clock, calls = Clock(), []

    def fan_out(handles):
        calls.append(list(handles))
        return family(len(calls))

    cache = ScrapeCache(fan_out, ttl_s=1.0, clock=clock)
    shards = [object(), object()]
    first = cache.get(shards)
    clock.now += 0.9
    assert cache.get(list(shards)) is first and len(calls) == 1
    clock.now += 0.2  # past the window: asked again
    assert cache.get(shards)[0].samples[0].value == 2 and len(calls) == 2
    # A model created or dropped (another set of shards): fresh at once.
    cache.get(shards[:1])
    assert len(calls) == 3 and calls[-1] == shards[:1]


def test_the_endpoint_wants_its_bearer_token_and_caches_the_fan_out():
    clock, calls = Clock(), []
    shard = object()
    metrics = CoordinatorMetrics(shards=lambda: [shard], models=lambda: 1)

    def fan_out(handles):
        calls.append(handles)
        return family(7)

    metrics._scrape_cache = ScrapeCache(fan_out, clock=clock)
    token = "metrics-token-0123456789abcdef"
    port = metrics.serve("127.0.0.1", 0, token_digest=token_sha256(f"{token}\n"))
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        assert get(url)[0] == 401
        assert get(url, "not-the-metrics-token-0123456789")[0] == 401
        assert calls == []  # refused scrapes collect nothing
        status, text = get(url, token)
        assert status == 200 and "optserve_test_gauge 7.0" in text and "optserve_models 1.0" in text
        assert get(url, token)[0] == 200
        assert len(calls) == 1  # two scrapes, one fan-out to the shards
    finally:
        metrics.stop()


def test_limit_flags_reach_the_edge_config_and_a_bad_one_stops_serve(ray_init):
    from optserve.server.cli.serve import LIMIT_FLAGS, _edge_config
    from optserve.server.edge.tokens import EdgeConfig

    parse = build_parser().parse_args
    default = _edge_config(parse(["serve"]))
    for name, _, _ in LIMIT_FLAGS:
        assert getattr(default, name) == getattr(EdgeConfig(), name), name
    given = _edge_config(parse(["serve", "--max-pulls-per-client", "3", "--stream-idle-s", "2.5",
                                "--max-staged-bytes-per-address", "1048576",
                                "--control-calls-per-s", "0.5"]))  # fmt: skip
    assert (given.max_pulls_per_client, given.stream_idle_s) == (3, 2.5)
    assert (given.max_staged_bytes_per_address, given.control_calls_per_s) == (1 << 20, 0.5)
    with pytest.raises(SystemExit, match="max_pulls_per_address must be a positive number"):
        _edge_config(parse(["serve", "--max-pulls-per-address", "0"]))
    assert ray_init == []  # checked before anything starts


def test_serve_says_once_at_start_when_kernels_cannot_compile(ray_init, monkeypatch, capsys):
    from optserve.server.engine import kernels

    monkeypatch.delenv("OPTSERVE_COMPILE", raising=False)
    monkeypatch.setattr(kernels, "compiler_problem", lambda device="cpu": "no C++ compiler here")
    with pytest.raises(Started):
        serve()
    warned = [line for line in capsys.readouterr().err.splitlines() if "compiler" in line]
    assert len(warned) == 1 and "WARNING: no C++ compiler here" in warned[0]
    assert "AdaBound" in warned[0] and "Delayed Nesterov" in warned[0] and "g++" in warned[0]
    monkeypatch.setattr(kernels, "compiler_problem", lambda device="cpu": None)
    with pytest.raises(Started):
        serve()
    assert "compiler" not in capsys.readouterr().err
