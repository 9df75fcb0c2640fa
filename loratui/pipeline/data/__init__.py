"""The data step: load, detect, validate, template with loss masks, split, preview, cache.

Entry point: ``loratui.pipeline.data.step:run`` (the recipe). Library modules: loaders (files),
formats (detection and validation), problems (what can be wrong and the policy for it), templates
(chat templates), render (chats with the spans to train), encode (tokens and labels), read (files to
split examples), tokens (token datasets and max_length), summary (report and preview), cache (the
datasets cache), build (the whole build, cached), manifest (dataset.json and report.json as typed
records), prepare (the data step run for a later step).
"""
