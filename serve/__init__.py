"""eaglecache.serve: export to vLLM's EAGLE3 format, acceptance benchmarks, serving, the demo."""
