"""Torch-free core shared by training and serving: feature spec, ID mapping, bundles."""

__version__ = "0.1.0"
