"""The optserve parameter server: engine, shard and coordinator actors, gRPC services, CLI."""
