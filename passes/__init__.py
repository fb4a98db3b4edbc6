"""lowbit's passes. Importing this package registers every built-in pass.

The framework lives in ``base`` (Pass, options, registry), ``pipeline`` (text and recipes) and
``manager`` (running with verification); each other module here is one pass.
"""

from lowbit.passes.base import Pass, option, registry  # noqa: F401

# Built-in passes register themselves on import.
from lowbit.passes import cleanup, equalize, finetune, fold_bn, fold_constants, lower, lowrank, prune, quantize, rotate, tucker  # noqa: E402,F401
