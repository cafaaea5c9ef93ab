"""eaglecache.train: DeepSpeed ZeRO-3 training of the EAGLE3 draft with TTT, streaming from the cache."""
