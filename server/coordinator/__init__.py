"""The coordinator: the catalogue and the control plane. It holds metadata, never a tensor.

* `catalogue`: what a model is (`ModelEntry`) and the coordinator's record of it.
* `launch`: placing and starting a model's shards (detached actors, placement groups).
* `control`: changes that take effect at one version boundary on every shard (the mechanism,
  and the coordinator's `ControlChanges`: swap, hyperparameters, schedule, metrics).
* `checkpoints`: taking a checkpoint (shards write, the coordinator writes the manifest) and
  planning a restore; the periodic policy. `persistence`: the coordinator's checkpoint and
  restore calls.
* `recovery`: adopting running shards after a restart, recovering broken or dead ones.
* `status`: what `optserve status` shows.
* `core`: the `Coordinator` that ties these together; `service`: its gRPC front door;
  `actor`: the Ray actor that runs both.
"""
