"""eaglecache.data: conversations to a tokenized, loss-masked Parquet set; regeneration; draft vocab."""
