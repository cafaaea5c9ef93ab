"""The on-disk formats of eaglecache, one module per format of docs/formats.md.

Each module owns its format's name, version, file names and keys, its reader and the validation of
what it reads. Writers and readers in the stages import from here, never from each other:

- ``dataset``: the prepared data set (``eaglecache.dataset``), written by ``data prepare``.
- ``cache``: the feature cache (``eaglecache.cache``): cache.json, the ``parts/`` layout, part.json,
  the manifest fingerprint and the one bytes-per-token figure; its reader is ``cache_reader``
  (``open_cache``, ``FeatureCache``), which reads shards through ``shard_reader``; ``shard_meta`` holds
  a shard's Zarr documents and ``bits`` the state encoding (bf16 bits, FP8 e4m3 with scales, checksums),
  which precompute's writer uses too.
- ``vocab``: the draft vocabulary mapping (``eaglecache.vocab``), written by ``data vocab``.
- ``draft``: the draft directory, written by export.
- ``run``: the run directory (run.json, metrics, committed checkpoints), written by training.

Nothing is re-exported here: import the format's module.
"""
