"""Keel trainer: recipe schema, data hand-off, TRL training under torchrun, tracking, export.

`torchrun -m trainer RECIPE [key=value ...]` runs one training process per rank.
"""
