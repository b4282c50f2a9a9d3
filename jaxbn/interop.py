"""``jaxbn.interop`` is :mod:`jaxbn.tools.interop`: weights between PyTorch and Flax.

The module lives in ``jaxbn.tools``; this file makes ``from jaxbn.interop import torch_to_flax``
and ``import jaxbn.interop`` work as documented, with the very same module object (no copy: a
function patched in one is patched in the other).
"""

import sys

from jaxbn.tools import interop as _interop

# The import system hands out whatever sys.modules holds under this name once this file ran.
sys.modules[__name__] = _interop
