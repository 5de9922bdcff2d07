"""Flax LLaMA pretraining example for optax_subspace.

Run ``python -m examples.llama train`` (see ``--help``) and
``python -m examples.llama compare RUN_DIR ...``.
"""
