"""Inference: using a routed model (the skipping engine itself is ``routing/execute.py``).

* ``cost.py``: FLOPs of a forward from its routing decisions, the yardstick of ideal speedups.
* ``generate.py``: text generation; ``speculative.py``: lossless self-speculative decoding (the
  routed model drafts, the same weights verify dense); ``export.py``: one self-contained model directory.
"""
