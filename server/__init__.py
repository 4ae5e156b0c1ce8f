"""The optserve parameter server: update engine, shard and coordinator actors, gRPC services, CLI."""
