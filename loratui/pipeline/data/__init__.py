"""The data step: load, detect, validate, template with loss masks, split, preview, cache.

Entry point: ``loratui.pipeline.data.step:run``. Modules: loaders (files), formats (detection and
validation), problems (what can be wrong and the policy for it), templates (chat templates),
encode (tokens and labels), step (orchestration, report, cache).
"""
