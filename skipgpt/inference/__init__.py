"""Inference: making skips real.

* ``engine.py``: the skipping path, which runs a module (or its replacement) only for the tokens
  that route there.
* ``kv.py``: KV policy ``drop`` (skipping tokens write no keys or values) and its cache.
* ``cost.py``: FLOPs of a forward from its routing decisions, the yardstick of ideal speedups.
* ``generate.py``: text generation; ``speculative.py``: lossless self-speculative decoding (the
  routed model drafts, the same weights verify dense); ``export.py``: one self-contained model directory.
"""
