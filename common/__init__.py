"""What the client and the server share, and neither owns: the tensor codec and wire frames, the
layout of a model across shards, the optimizer, schedule and mode configs, the errors with their
gRPC status codes, and what a token is. It imports neither side."""
