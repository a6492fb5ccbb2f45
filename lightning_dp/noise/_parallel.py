"""What the CPU noise paths share: the optional native kernels and one pool of worker threads.

The native kernels (``_boxmuller``) release the GIL, and so does OpenSSL's keystream for large buffers,
so plain Python threads run them in parallel. One pool serves both generators: it is created on first
use, replaced when a forked child (a DataLoader worker) or a larger thread count needs a new one, and
its idle workers cost nothing.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Callable, Optional, Sequence, TypeVar

T = TypeVar("T")


def load_native() -> Any:
    """``lightning_dp.noise._boxmuller``, or ``None`` when it was not built (or ``LIGHTNING_DP_NATIVE_NOISE=0``)."""
    if os.environ.get("LIGHTNING_DP_NATIVE_NOISE", "1") == "0":
        return None
    try:
        from . import _boxmuller
    except ImportError:
        return None
    return _boxmuller


_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
_pool_key: tuple = ()  # (pid, workers) of _pool
_pool_lock = threading.Lock()


def _pool_with(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The shared pool, with at least ``workers`` threads, created in this process."""
    global _pool, _pool_key
    pid = os.getpid()
    with _pool_lock:
        if _pool is None or _pool_key[0] != pid or _pool_key[1] < workers:
            if _pool is not None and _pool_key[0] == pid:
                _pool.shutdown(wait=False)  # more threads wanted: let the old workers exit
            _pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="lightning_dp-noise")
            _pool_key = (pid, workers)
        return _pool


def run_parallel(fn: Callable[[T], None], tasks: Sequence[T], workers: int) -> None:
    """``fn(task)`` for every task, on up to ``workers`` threads: the calling one and the pool's.

    Each thread takes the next task when it is done with one, so on shared cores a thread the OS leaves
    waiting holds up one task, not a fixed share; the call returns once every task is done (a pool thread
    that starts late finds none left and is not waited for). After an error no new task starts; the
    first error is re-raised once the tasks already running have finished.
    """
    count = len(tasks)
    if workers <= 1 or count <= 1:
        for task in tasks:
            fn(task)
        return
    progress = threading.Condition()
    taken, finished, errors = [0], [0], []

    def loop() -> None:
        while True:
            with progress:
                if errors or taken[0] >= count:
                    return
                index = taken[0]
                taken[0] += 1
            try:
                fn(tasks[index])
            except BaseException as err:  # re-raised in the calling thread
                with progress:
                    errors.append(err)
            finally:
                with progress:
                    finished[0] += 1
                    progress.notify_all()

    pool = _pool_with(workers - 1)
    for _ in range(min(workers, count) - 1):
        pool.submit(loop)
    loop()
    with progress:
        progress.wait_for(lambda: finished[0] == taken[0])
    if errors:
        raise errors[0]
