"""The configs that ship inside the package (``eaglecache.configs``): ``tiny.yaml``, the CPU default, and
``minimax_m3/`` (the seed's production settings and job scripts). ``--config NAME`` finds them by name."""
