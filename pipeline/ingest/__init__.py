"""The ingest stage: image folder -> prepared uint8/uint16 Zarr store and manifest."""
