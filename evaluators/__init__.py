"""maeclip's evaluators: zero-shot classification and the gate that decides whether a checkpoint may go on.

One module per evaluation; class names and prompt templates live as data in ``assets/`` with their source
cited. Evaluators read checkpoints and corpora through ``trainer`` and import nothing else of ours
(``pipelines`` builds on this package, never the other way round).
"""
