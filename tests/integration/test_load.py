"""Load: 16 trainer processes x 200 async pushes on loopback, against a 2-shard Adam model.

What must hold under concurrent load: no push fails, every push is applied exactly once (the
final version is 16 x 200 on every shard, and the leader logged each trainer 200 times), and
the server processes' memory stops growing once warmed up. Throughput is printed, never
asserted: CI machines differ too much for a timing bound to mean anything.
"""

from __future__ import annotations

import collections
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.load_trainer import SHAPES

TRAINER = Path(__file__).resolve().parents[1] / "helpers" / "load_trainer.py"
TRAINERS = 16
PUSHES = 200
TOTAL = TRAINERS * PUSHES
# Warm-up: the first quarter of the pushes. By then every lazily made thing exists (handler
# threads, channels, Adam's state, allocator arenas); growth after it is what a leak looks like.
WARMUP_VERSION = TOTAL // 4
# Allowed RSS growth per server process from the end of warm-up to the end. Well above the
# noise of a Python process (the leader's bounded decision log alone adds ~3 MiB over 2400
# updates), but a leak of one shard's gradient slice per push (~16 KiB x 2400) would exceed it.
RSS_GROWTH_BOUND_KIB = 16 * 1024
SAMPLE_S = 0.5
# Sixteen processes importing torch on a two-core machine take a while to be ready.
READY_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 420.0


def _proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process on this machine, in KiB (psutil is not a dependency)."""
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0])  # "  123456 kB"
    return figures


class _RssSampler(threading.Thread):
    """Samples the model's version and each server process's RSS every SAMPLE_S seconds.

    The version comes from the leader's Ray control plane, not from a pull, so sampling adds
    no data-plane traffic to the load being measured."""

    def __init__(self, pids: dict[str, int], leader) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pids = pids
        self.leader = leader
        self.samples: list[dict] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def sample(self) -> None:
        import ray

        version = ray.get(self.leader.version.remote(), timeout=60)
        rss = {name: _proc_status_kib(pid)["VmRSS"] for name, pid in self.pids.items()}
        self.samples.append({"t": time.monotonic(), "version": version, "rss_kib": rss})

    def run(self) -> None:
        try:
            while not self._stop_event.wait(SAMPLE_S):
                self.sample()
        except BaseException as exc:  # noqa: BLE001 - reported by the test, not lost in a thread
            self.error = exc

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=120)


def _server_pids(service, model: str) -> dict[str, int]:
    """Pids of the coordinator actor and of each of the model's shard actors.

    `__ray_call__` (Ray >= 2.50) runs a function inside the actor's process, so this needs no
    method on the server classes."""
    import ray

    def pid_of(actor) -> int:
        return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)

    pids = {"coordinator": pid_of(service.actor)}
    for index, shard in enumerate(ray.get(service.actor.shard_actors.remote(model))):
        pids[f"shard{index}"] = pid_of(shard)
    return pids


def _start_trainers(address: str, model: str, tmp_path: Path) -> subprocess.Popen:
    """The launcher of the TRAINERS trainer processes (tests/helpers/load_trainer.py)."""
    args = ["--address", address, "--model", model, "--trainers", str(TRAINERS)]
    args += ["--pushes", str(PUSHES), "--seed", "0", "--out-dir", str(tmp_path)]
    with open(tmp_path / "trainers.stderr", "w") as stderr:  # the child holds its own descriptor
        return subprocess.Popen(
            [sys.executable, str(TRAINER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # its trainers share its process group, killed together
        )


def _stderr_of(tmp_path: Path) -> str:
    return (tmp_path / "trainers.stderr").read_text()[-3000:]


def _await_ready(launcher: subprocess.Popen, tmp_path: Path) -> None:
    """Wait until the launcher printed `ready`: every trainer connected and knows the layout."""
    with selectors.DefaultSelector() as selector:
        selector.register(launcher.stdout, selectors.EVENT_READ)
        if not selector.select(READY_TIMEOUT_S):
            pytest.fail(
                f"trainers not ready after {READY_TIMEOUT_S:.0f} s:\n{_stderr_of(tmp_path)}"
            )
    line = launcher.stdout.readline()
    if line.strip() != "ready":
        pytest.fail(f"the launcher said {line!r} before ready:\n{_stderr_of(tmp_path)}")


def _figures(samples: list[dict], end: dict, hwm: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per process, in KiB: RSS before the first push, at the end of warm-up, peak, at the end."""
    warm = next(s for s in samples if s["version"] >= WARMUP_VERSION)
    figures = {}
    for name in end["rss_kib"]:
        figures[name] = {
            "start_kib": samples[0]["rss_kib"][name],
            "warmup_end_kib": warm["rss_kib"][name],
            "peak_kib": max(s["rss_kib"][name] for s in samples),
            "end_kib": end["rss_kib"][name],
            "hwm_kib": hwm[name],
            "growth_after_warmup_kib": end["rss_kib"][name] - warm["rss_kib"][name],
        }
    return figures


@pytest.mark.slow
def test_sixteen_async_trainers_push_without_errors_or_memory_growth(
    service, client, model_name, tmp_path
):
    import ray

    run_started = time.monotonic()
    generator = torch.Generator().manual_seed(12345)
    initial = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    client.create_model(
        model_name, initial, {"name": "adam", "lr": 1e-3}, num_shards=2, mode={"mode": "async"}
    )
    shards = ray.get(service.actor.shard_actors.remote(model_name))
    assert len(shards) == 2
    pids = _server_pids(service, model_name)
    sampler = _RssSampler(pids, shards[0])
    launcher = _start_trainers(service.address, model_name, tmp_path)
    try:
        _await_ready(launcher, tmp_path)
        sampler.sample()  # before the first push
        sampler.start()
        go = time.monotonic()
        launcher.stdin.write("go\n")
        launcher.stdin.flush()
        launcher.communicate(timeout=RUN_TIMEOUT_S)
        pushing_s = time.monotonic() - go
        assert launcher.returncode == 0, f"trainers failed:\n{_stderr_of(tmp_path)}"
        reports = [json.loads((tmp_path / f"t{k}.json").read_text()) for k in range(TRAINERS)]
    finally:
        sampler.stop()
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=30)
    assert sampler.error is None, f"sampling failed: {sampler.error!r}"
    sampler.sample()  # after the last push
    end = sampler.samples[-1]
    hwm = {name: _proc_status_kib(pid)["VmHWM"] for name, pid in pids.items()}

    # Correctness under load: no errors, every push applied once, on every shard.
    errors = {r["trainer"]: (r["errors"], r["messages"]) for r in reports if r["errors"]}
    assert not errors, f"pushes failed: {errors}"
    assert [r["ok"] for r in reports] == [PUSHES] * TRAINERS
    assert all(r["increasing"] for r in reports), reports
    _, version = client.pull(model_name)
    assert version == TOTAL
    infos = ray.get([shard.info.remote() for shard in shards])
    assert [i["version"] for i in infos] == [TOTAL] * len(shards)
    assert not any(i["broken"] for i in infos) and all(i["staged"] == 0 for i in infos)
    log = ray.get(shards[0].decisions.remote())
    assert [entry["version"] for entry in log] == list(range(1, TOTAL + 1))
    per_trainer = collections.Counter(t for entry in log for t in entry["trainers"])
    assert per_trainer == {f"t{k}": PUSHES for k in range(TRAINERS)}

    # Figures: printed (run pytest with -s) and kept as JSON next to the trainers' stderr.
    logged_s = log[-1]["time"] - log[0]["time"]
    figures = {
        "trainers": TRAINERS,
        "pushes_per_trainer": PUSHES,
        "floats": sum(t.numel() for t in initial.values()),
        "num_shards": len(shards),
        "pushes_per_s_wall": TOTAL / pushing_s,
        "pushes_per_s_logged": (TOTAL - 1) / logged_s if logged_s > 0 else None,
        "pushing_s": pushing_s,
        "trainer_seconds_max": max(r["seconds"] for r in reports),
        "samples": len(sampler.samples),
        "warmup_version": WARMUP_VERSION,
        "rss": _figures(sampler.samples, end, hwm),
        "test_s_before_checks": time.monotonic() - run_started,
    }
    (tmp_path / "load_figures.json").write_text(json.dumps(figures, indent=2))
    (tmp_path / "rss_samples.json").write_text(json.dumps(sampler.samples))
    (tmp_path / "trainers.json").write_text(json.dumps(reports, indent=1))
    (tmp_path / "decisions.json").write_text(json.dumps(log))
    print(f"\nload figures ({tmp_path / 'load_figures.json'}):")
    print(
        f"  {TOTAL} pushes in {pushing_s:.1f} s: {figures['pushes_per_s_wall']:.0f} pushes/s "
        f"(wall, from go), {figures['pushes_per_s_logged'] or 0:.0f} pushes/s (leader's log)"
    )
    for name, f in figures["rss"].items():
        print(
            f"  {name:12s} RSS MiB: start {f['start_kib'] / 1024:.1f}, "
            f"warm-up end {f['warmup_end_kib'] / 1024:.1f}, peak {f['peak_kib'] / 1024:.1f} "
            f"(HWM {f['hwm_kib'] / 1024:.1f}), end {f['end_kib'] / 1024:.1f}, "
            f"growth after warm-up {f['growth_after_warmup_kib'] / 1024:+.1f}"
        )

    # Memory flat after warm-up.
    grown = {
        name: f["growth_after_warmup_kib"]
        for name, f in figures["rss"].items()
        if f["growth_after_warmup_kib"] > RSS_GROWTH_BOUND_KIB
    }
    assert not grown, f"RSS grew by more than {RSS_GROWTH_BOUND_KIB} KiB after warm-up: {grown}"
