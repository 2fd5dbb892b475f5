"""Offline half: datasets, models, training, evaluation and export.

Importing this package does not import torch; ``training.data`` is torch-free so
``ctr load`` can run where only the serving dependencies are installed.
"""
