"""lmzoo: a zoo of PyTorch language models driven by YAML configs and one CLI.

The package root stays light (no torch import) so that `lmzoo --help` is instant.
"""

__version__ = "0.1.0"
