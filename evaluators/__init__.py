"""maeclip's evaluators: zero-shot classification, linear probes, retrieval, grounding, the VQA probe (questions
generated from the shapes scenes, or VQAv2-format annotations) and the linear segmentation probe on frozen
towers, the suites that run them on a checkpoint, watch mode, and the gate that registers passing checkpoints in
the MLflow registry.

One module per evaluation; class names and prompt templates live as data in ``assets/`` with their source
cited. Evaluators read checkpoints and corpora through ``trainer`` and import nothing else of ours
(``pipelines`` builds on this package, never the other way round).
"""
