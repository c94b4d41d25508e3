"""Shared machinery: locations, output checks, publish, locks, the Dask runner, digests."""
