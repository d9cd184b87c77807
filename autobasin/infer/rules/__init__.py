"""Built-in rules, one file per op family. Importing registers them."""
from . import attention, elementwise, linear, norm, recurrent, reduce, shape  # noqa: F401
from . import aten  # noqa: F401  - after the others: it reuses their rules
