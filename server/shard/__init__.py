"""A shard: one contiguous slice of every parameter group of one model, with its optimizer state.

* `state`: the slice's buffers and the stage → apply steps of a push (`ShardState`).
* `sequencer`: the leader's ordering of pushes into versions (shard 0 of each model).
* `service`: the shard's gRPC data plane (Push, Pull, Load, Sequence).
* `checkpoint`: writing its slice to, and reading its range from, the checkpoint store.
* `memory`: pooled push and pull buffers, populated memory.
* `actor`: the Ray actor that holds all of the above.
"""
