"""Training: the stages that fit what routing adds, the base model frozen throughout.

* ``loop.py``: the loop every stage shares (data order, accumulation, logging, resume).
* ``checkpoint.py``: atomic, resumable checkpoints.
* ``losses.py``: LM / KL / hidden-state distillation and the sparsity penalty.
* ``replacements.py`` and ``importance.py``: data-driven starting points (fitted replacements,
  a Block-Influence seed).
* ``tune.py``: stage 1, router tuning. ``calibrate.py``: the decision threshold that makes argmax
  routing deliver a ratio.
* ``finetune.py``: stage 2, LoRA with frozen routers (and the Joint and Dense+LoRA references).
"""
