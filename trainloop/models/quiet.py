"""Third-party messages that trainloop itself causes and that say nothing to its user, silenced
where trainloop causes them: one named message, one logger, for the length of one call. Never
a filter left installed, never a whole logger or warning category.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator


class _DropMatching(logging.Filter):
    """Drops the records whose message matches `pattern`; passes every other record."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@contextlib.contextmanager
def _dropping(logger_name: str, pattern: str) -> Iterator[None]:
    logger, drop = logging.getLogger(logger_name), _DropMatching(pattern)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def torchao_import(cuda_available: bool) -> Iterator[None]:
    """Around trainloop's first import of torchao (precision='fp8'), drop what that import logs
    and the user can do nothing about:

    - without CUDA: "Failed to load .../_C_*.so", one line per optional CUDA kernel library
      that cannot load on this machine (float8 training then runs emulated, as intended);
    - torch's pytree deprecation for torchao's own `register_constant` calls on Enum classes.

    Anything else either logs passes; a torchao already imported is not imported again, so
    nothing is dropped then.
    """
    if "torchao" in sys.modules:
        yield
        return
    with contextlib.ExitStack() as stack:
        if not cuda_available:
            stack.enter_context(_dropping("torchao", r"^Failed to load .*_C\w*\.\S*so\b"))
        stack.enter_context(_dropping("torch.utils._pytree",
                                      r"is an Enum subclass and is now natively supported by torch\.compile"))
        yield
