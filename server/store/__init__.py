"""The checkpoint store: the manifest format (`manifest`) and the per-shard safetensors files,
written and read block by block (`tensorfile`), on a local path or any fsspec URI (`files`:
opening them, direct I/O and its aligned buffers)."""
