"""maeclip's trainer: configuration, data, models, the training loop, checkpoints, tracking, TorchX components.

Imports nothing else of ours (``evaluators`` and ``pipelines`` build on it, never the other way round).
"""
