"""Checkpoint faults (issue 17): a full disk, broken checkpoints, and a drop during a checkpoint.

The faults are made inside the processes that meet them: a shard's file writes fail with
ENOSPC (its `write_tensors` replaced, in that shard's process only), the session coordinator's
store is told it has no room, and checkpoints on disk are broken by hand. The session service is
shared, so whatever a test changes in the coordinator it puts back.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from optserve.client import ParameterServerClient
from optserve.common.errors import Aborted, OptserveError, ResourceExhausted, Unavailable
from optserve.server.store.manifest import Store
from tests.integration.test_metrics import scrape, total

SHAPES = {"w": (6, 5), "b": (7,)}
ADAM = {"name": "adam", "lr": 0.01}


def initial():
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def on_coordinator(service, fn):
    """Run fn(coordinator) inside the session's coordinator actor."""
    return ray.get(service.actor.__ray_call__.remote(lambda actor: fn(actor._coordinator)))


def shards(service, model):
    return ray.get(service.actor.shard_actors.remote(model))


def disk_full(shard) -> None:
    """From now on the shard's checkpoint files fail as on a full disk (in its process only)."""

    def patch(actor):
        import errno

        import optserve.server.shard.checkpoint as m

        m.__dict__.setdefault("_real_write_tensors", m.write_tensors)

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        m.write_tensors = full

    ray.get(shard.__ray_call__.remote(patch))


def heal(shard) -> None:
    def patch(actor):
        import optserve.server.shard.checkpoint as m

        m.write_tensors = m.__dict__.get("_real_write_tensors", m.write_tensors)

    ray.get(shard.__ray_call__.remote(patch))


def checkpoint_dirs(checkpoint_dir, model) -> list[str]:
    """Every checkpoint directory of a model, complete or not."""
    root = Path(checkpoint_dir) / model
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


def wait_for(what, check, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


def test_a_full_disk_backs_off_leaves_nothing_and_is_counted(
    service, client, model_name, checkpoint_dir
):
    client.create_model(model_name, initial(), ADAM, num_shards=2,
                        checkpoint={"every_versions": 1})  # fmt: skip
    victim = shards(service, model_name)[1]
    disk_full(victim)
    client.push(model_name, grads(0), version=0)  # a periodic checkpoint is due now
    checkpoint = wait_for("a failed periodic checkpoint",
                          lambda: (c := client.status(model_name)["checkpoint"])
                          ["failures_in_a_row"] and c)  # fmt: skip
    # It waits 15 s before the next try (not 0.5 s), then 30 s: the coordinator's computed
    # waits are read, no time is measured.
    assert checkpoint["failures_in_a_row"] == 1 and 0 < checkpoint["next_try_in_s"] <= 15

    def scheduled_wait_s(coordinator):  # from the failure to the next try, as scheduled
        record = coordinator.get(model_name)
        now = time.monotonic(), time.time()
        return record.checkpoint_retry_at - now[0] + now[1] - record.last_checkpoint_failure["time"]

    assert 14.9 <= on_coordinator(service, scheduled_wait_s) < 16
    assert checkpoint["last_failure"]["reason"] == "disk_full"
    assert "No space left" in checkpoint["last_failure"]["error"]
    assert checkpoint_dirs(checkpoint_dir, model_name) == []  # the partial write is gone

    def retry_now(coordinator):
        coordinator.get(model_name).checkpoint_retry_at = 0.0

    on_coordinator(service, retry_now)
    checkpoint = wait_for("a second failure",
                          lambda: (c := client.status(model_name)["checkpoint"])
                          ["failures_in_a_row"] == 2 and c)  # fmt: skip
    assert 0 < checkpoint["next_try_in_s"] <= 30
    assert 29.9 <= on_coordinator(service, scheduled_wait_s) < 31
    # Asked for one, the admin hears what failed, with the right status; training goes on.
    with pytest.raises(ResourceExhausted, match="store is full"):
        client.checkpoint(model_name)
    assert client.push(model_name, grads(1), version=1) == 2
    assert checkpoint_dirs(checkpoint_dir, model_name) == []
    assert total(scrape(service), "optserve_checkpoint_failures_total", model=model_name,
                 reason="disk_full") == 3  # fmt: skip
    heal(victim)
    on_coordinator(service, retry_now)
    wait_for("a good checkpoint", lambda: client.list_checkpoints(model_name))
    checkpoint = client.status(model_name)["checkpoint"]
    assert checkpoint["failures_in_a_row"] == 0 and checkpoint["next_try_in_s"] is None
    assert checkpoint["last_version"] == 2


def test_a_store_without_room_refuses_before_training_is_held(
    service, client, model_name, checkpoint_dir
):
    client.create_model(model_name, initial(), ADAM, checkpoint={"enabled": False})
    client.push(model_name, grads(0), version=0)
    client.checkpoint(model_name)  # fine: it has room
    on_coordinator(service, lambda c: setattr(c.store, "free_bytes", lambda: 0))
    try:
        with pytest.raises(ResourceExhausted, match="bytes free"):
            client.checkpoint(model_name)
    finally:
        on_coordinator(service, lambda c: c.store.__dict__.pop("free_bytes", None))
    # Refused before the model was held: no directory was even made for it.
    assert len(checkpoint_dirs(checkpoint_dir, model_name)) == 1
    assert client.status(model_name)["checkpoint"]["last_failure"]["reason"] == "disk_full"


def _break(path: Path, how: str) -> None:
    manifest = path / "manifest.json"
    body = json.loads(manifest.read_text())
    shard_file = path / body["shards"][0]["file"]
    if how == "missing file":
        shard_file.unlink()
    elif how == "truncated file":
        shard_file.write_bytes(shard_file.read_bytes()[: shard_file.stat().st_size // 2])
    elif how == "bad json":
        manifest.write_text('{"format": "optserve-checkpoint/2", "model"')
    elif how == "key error":  # a group names a parameter the manifest does not have
        body["groups"][0]["params"].append("nobody")
        manifest.write_text(json.dumps(body))
    elif how == "wrong shape":
        body["params"][0]["shape"] = [7, 5]
        manifest.write_text(json.dumps(body))
    elif how == "bad config":
        body["group_configs"]["default"]["lr"] = -1.0
        manifest.write_text(json.dumps(body))


BREAKS = ("missing file", "truncated file", "bad json", "key error", "wrong shape", "bad config")


def test_recovery_falls_back_past_any_broken_checkpoint(
    service, client, model_name, checkpoint_dir
):
    keep = on_coordinator(service, lambda c: c.keep_checkpoints)
    on_coordinator(service, lambda c: setattr(c, "keep_checkpoints", 10))
    try:
        client.create_model(model_name, initial(), ADAM, checkpoint={"enabled": False})
        client.push(model_name, grads(0), version=0)
        good = client.checkpoint(model_name)
        at_good, _ = client.pull(model_name)
        broken = []
        for step, how in enumerate(BREAKS, start=1):
            client.push(model_name, grads(step), version=step)
            broken.append((client.checkpoint(model_name)["name"], how))
    finally:
        on_coordinator(service, lambda c: setattr(c, "keep_checkpoints", keep))
    for name, how in broken:
        _break(Path(checkpoint_dir) / model_name / name, how)
    before = total(scrape(service), "optserve_checkpoint_fallbacks_total", model=model_name)
    leader = shards(service, model_name)[0]
    ray.get(leader.__ray_call__.remote(lambda self: self._state.mark_broken("a test broke it")))

    def restored():
        try:
            audit = client.status(model_name)["audit"]
        except Unavailable:
            return False
        return audit and audit[-1]["action"] == "restore" and audit[-1]

    entry = wait_for("the model to come back", restored)
    assert entry["caller"] == "recovery" and entry["new"]["checkpoint"] == good["name"]
    # The audit entry (shown by status) names each broken checkpoint passed over, and why.
    passed = entry["new"]["passed_over"]
    assert [p["checkpoint"] for p in passed] == [name for name, _ in reversed(broken)]
    assert all(p["reason"] and p["error"] for p in passed)
    weights, version = client.pull(model_name)
    assert version == good["version"] == 1
    assert all(torch.equal(weights[n], at_good[n]) for n in SHAPES)
    fallbacks = total(scrape(service), "optserve_checkpoint_fallbacks_total", model=model_name)
    assert fallbacks - before == len(BREAKS)


def test_a_drop_waits_for_a_checkpoint_in_flight_which_then_publishes_nothing(
    service, client, model_name, checkpoint_dir, tmp_path
):
    client.create_model(model_name, initial(), ADAM, checkpoint={"enabled": False})
    client.push(model_name, grads(0), version=0)
    started, go = tmp_path / "started", tmp_path / "go"

    def hold_writes(actor):  # the shard's write waits for the test's word
        import optserve.server.shard.checkpoint as m

        real = m.write_tensors

        def held(*args, **kwargs):
            started.touch()
            deadline = time.monotonic() + 60
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            return real(*args, **kwargs)

        m.write_tensors = held

    ray.get(shards(service, model_name)[0].__ray_call__.remote(hold_writes))
    outcome: dict[str, BaseException | None] = {}

    def call(key, fn):
        try:
            with ParameterServerClient(service.address) as c:
                fn(c)
            outcome[key] = None
        except BaseException as exc:  # noqa: BLE001 - looked at below
            outcome[key] = exc

    checkpointing = threading.Thread(
        target=call, args=("checkpoint", lambda c: c.checkpoint(model_name))
    )
    checkpointing.start()
    wait_for("the shard to start writing", started.exists)
    dropping = threading.Thread(target=call, args=("drop", lambda c: c.drop_model(model_name)))
    dropping.start()

    def drop_begun(coordinator):
        record = coordinator._models.get(model_name)
        return record is not None and record.dropping

    wait_for("the drop to begin", lambda: on_coordinator(service, drop_begun))
    with pytest.raises(OptserveError):  # no checkpoint starts once a drop began
        client.checkpoint(model_name)
    go.touch()
    checkpointing.join(120)
    dropping.join(120)
    assert outcome["drop"] is None, outcome["drop"]
    assert isinstance(outcome["checkpoint"], Aborted), outcome["checkpoint"]
    assert "dropped" in str(outcome["checkpoint"])
    assert model_name not in client.list_models()
    # Nothing of the cut checkpoint is left, and a restart would not bring the model back.
    assert checkpoint_dirs(checkpoint_dir, model_name) == []
    store = Store(checkpoint_dir)
    assert store.list(model_name) == [] and store.dropped_after_last_checkpoint(model_name)
    assert total(scrape(service), "optserve_checkpoint_failures_total", model=model_name,
                 reason="dropped") == 1  # fmt: skip


def test_a_drop_the_store_cannot_record_is_refused_and_changes_nothing(
    service, client, model_name, checkpoint_dir
):
    client.create_model(model_name, initial(), ADAM, checkpoint={"enabled": False})
    client.checkpoint(model_name)

    def refuse(coordinator):
        def broken(model):
            raise OSError(5, "Input/output error")

        coordinator.store.mark_dropped = broken

    on_coordinator(service, refuse)
    try:
        with pytest.raises(Unavailable, match="a restart would bring the model back"):
            client.drop_model(model_name)
    finally:
        on_coordinator(service, lambda c: c.store.__dict__.pop("mark_dropped", None))
    assert model_name in client.list_models()
    assert client.push(model_name, grads(0), version=0) == 1
    client.drop_model(model_name)
    assert model_name not in client.list_models()
    assert Store(checkpoint_dir).dropped_after_last_checkpoint(model_name)
    client.restore(model_name)  # the operator takes the drop back: a restart keeps it too
    assert not Store(checkpoint_dir).dropped_after_last_checkpoint(model_name)
