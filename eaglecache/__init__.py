"""eaglecache: offline EAGLE3 draft training from cached target hidden states.

The stage folders at the top of the repository are subpackages of this import
root: ``eaglecache.data``, ``eaglecache.precompute``, ``eaglecache.train`` and
``eaglecache.serve``. This package holds the glue they share: the config
schema, the command line, errors and the embedded tiny target.
"""

__version__ = "0.1.0"
