"""Evaluation: one protocol for dense, routed, LoRA-recovered and pruned models.

* ``perplexity.py``: token perplexity over fixed windows of a whole test set.
* ``zeroshot_tasks.py`` and ``zeroshot.py``: the paper's seven tasks through lm-evaluation-harness,
  offline from local files.
* ``analysis.py`` (computations), ``plots.py`` (figures) and ``figures.py`` (both, end to end):
  the paper's routing analyses.
* ``report.py``: the Markdown tables every command prints.
* ``scoreboard.py``: the paper-style table and figure of ``skipgpt compare``, with bootstrap intervals.
"""
