"""eaglecache.precompute: vLLM runs the target and its hidden states land in sharded Zarr v3 caches."""
