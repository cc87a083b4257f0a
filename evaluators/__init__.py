"""maeclip's evaluators: zero-shot classification, linear probes, retrieval, grounding, the VQA probe (questions
generated from the shapes scenes, or VQAv2-format annotations) and the linear segmentation probe on frozen
towers, the suites and task files that run them on a checkpoint, watch mode, and the gate that registers passing
checkpoints in the MLflow registry.

One module per evaluation, each owning what it keeps from a batch and how it finishes (``protocol.py``);
``suite.py`` holds the suites' entries and the one streaming loop, ``tasks.py`` the task-file format. Adding an
evaluation touches its module and one suite entry (or one task-file kind). Class names, prompt templates and the
shipped task files live as data in ``assets/`` with their source cited. Evaluators read checkpoints and eval
sets through ``trainer`` and import nothing else of ours (``pipelines`` builds on this package, never the other
way round).
"""
