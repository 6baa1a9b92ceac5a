"""Module hooks that act only in the thread that installed them.

PyTorch hooks belong to the module, not to a call: a hook installed by the edit worker would also
fire inside a generation running at the same moment in another thread. Wrapped hooks check the
thread and do nothing elsewhere.
"""

from __future__ import annotations

from contextlib import contextmanager
import threading
from typing import Callable, Iterator

from torch import nn


def _this_thread_only(hook: Callable) -> Callable:
    owner = threading.get_ident()

    def guarded(*args, **kwargs):
        if threading.get_ident() == owner:
            return hook(*args, **kwargs)
        return None

    return guarded


@contextmanager
def thread_hooks(
    pre: list[tuple[nn.Module, Callable]] = (), post: list[tuple[nn.Module, Callable]] = ()
) -> Iterator[None]:
    """Install forward pre-hooks and forward hooks (both with kwargs) for this thread, then remove them."""
    handles = [module.register_forward_pre_hook(_this_thread_only(h), with_kwargs=True) for module, h in pre]
    handles += [module.register_forward_hook(_this_thread_only(h), with_kwargs=True) for module, h in post]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
