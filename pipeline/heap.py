"""What the process's memory holds in use, as opposed to what its allocators keep mapped: the
two differ after a burst, and only the first grows with a leak. docs/observability.md
("Memory") says what each measure covers; the soak run judges them (docs/testing.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


def allocated_blocks() -> int:
    """The memory blocks the interpreter has allocated and not freed: every live object, and
    each buffer Python allocates for one, counts one."""
    return sys.getallocatedblocks()


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (malloc.h), every field a size_t.
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        call = ctypes.CDLL(name).mallinfo2  # glibc 2.33 and later
    except (OSError, AttributeError):
        return None
    call.restype = _MallInfo2
    call.argtypes = []
    return call


def malloc_in_use_bytes() -> int | None:
    """The bytes C's malloc has handed out and not had back: the large objects and buffers
    (more than 512 bytes each, which Python's own small-object allocator does not serve) and
    the C libraries' memory. Free memory malloc keeps mapped is not counted. None where the C
    library is not glibc 2.33 or later."""
    call = _mallinfo2()
    if call is None:
        return None
    info = call()
    return int(info.uordblks + info.hblkhd)  # in the heaps, and in chunks of their own mmap
