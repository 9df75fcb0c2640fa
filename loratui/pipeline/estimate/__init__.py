"""Estimates before training: time, memory and disk, and what fits (``loratui estimate``).

``shape`` reads a model's sizes from its config, ``data`` counts the tokens, ``memory``, ``disk`` and
``timing`` price a run, ``fit`` lists the changes that make it fit, ``plan`` puts them together and
``record`` is the result (JSON and the panel people read). The probe that measures a few real steps
lives with training (:mod:`loratui.pipeline.train.probe`).
"""
