"""The Zarr stores on disk: layout and attributes, whole-shard writes, direct shard reads."""
