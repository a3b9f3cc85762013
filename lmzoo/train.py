"""`lmzoo.train.train`, the training entry point, kept where scripts have always imported it from."""

from lmzoo.training.loop import train

__all__ = ["train"]
