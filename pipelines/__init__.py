"""Kubeflow Pipelines (kfp v2) composition of maeclip's steps, and the ``maeclip`` command line.

Imports ``trainer`` and ``evaluators``; holds no ML logic. Each kfp component is a thin wrapper over the
same function the CLI calls, imported inside the component body (kfp ships the body, not the module).
"""
