"""The optserve parameter server, in rooms (docs/architecture.md draws them):

* `engine`: update rules, schedules, Lookahead and migration on flat tensors (no Ray, no gRPC);
* `shard`: a model's slice, its push pipeline and the leader's sequencer, the data plane;
* `coordinator`: the catalogue and the control plane (metadata only);
* `edge`: auth, limits, TLS and gRPC plumbing (no Ray);
* `store`: the checkpoint format;
* `cli`, `demo`, `runtime`, `metrics`: the `optserve` command, the demo, starting the service.
"""
