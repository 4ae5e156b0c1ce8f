"""A shard: one contiguous slice of every parameter group of one model, with its optimizer state.

* `state`: the slice's buffers, what staging and applying a push do to them (`ShardState`).
* `pipeline`: one push through one shard: stage → decide (ask the leader) → apply.
* `sequencer`: the leader's decisions (shard 0 of each model): the order of pushes, and for
  each update its members and weights, each group's lr from the model's one schedule, and the
  staleness scale.
* `service`: the shard's gRPC data plane (Push, Pull, Load, Sequence).
* `checkpoint`: writing its slice to, and reading its range from, the checkpoint store.
* `memory`: pooled push and pull buffers, populated memory.
* `actor`: the Ray actor that holds all of the above.
"""
