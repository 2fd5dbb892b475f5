"""Dataset adapters. Each returns a raw DataFrame in the generic layout (see ``generic``)."""

from training.data.generic import load_catalog, load_frame, split_frame

__all__ = ["load_catalog", "load_frame", "split_frame"]
