"""Routing: what skipgpt adds to a base model, the PEFT way.

* ``adapters.py``: where each architecture keeps its layers, branches and norms (one table).
* ``routers.py``: the per-module router, the replacement a skipped module leaves, and how router
  logits become gates (Gumbel straight-through, argmax, MoD top-k, D-LLM budgets).
* ``forward.py``: the routed decoder layer, ``x + g·f(x)``, for every architecture.
* ``state.py``: what the routed layers of one model share (gate mode, the last decisions).
* ``surgery.py``: attaching and detaching routers in place, gate modes, sparsity meters.
* ``sparsity.py``: module sparsity and parameter ratio from hard gates, padding excluded.
* ``save_load.py``: router sets on disk (``router_config.json`` + ``routers.safetensors``).
* ``execute.py``: the skipping engine, which runs a module (or its replacement) only for the
  tokens that route there; ``kv.py``: KV policy ``drop`` and its cache.
* ``hub.py``: the routed model as a Hugging Face class, so that an export loads routed with
  ``trust_remote_code=True``.
"""
