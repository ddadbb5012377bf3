"""Speed benchmarks (`make bench`); see __main__.py for the row format."""
import contextlib
import os
import statistics
import time


def median_time(fn, warmup: int = 1, repeats: int = 3) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` runs (seconds)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@contextlib.contextmanager
def torch_threads(n: int | None = None):
    """torch's intra-op threads for the block: n, else CEDM_BENCH_THREADS (default 1); the previous
    count is restored afterwards. Yields the count (printed with every row)."""
    import torch

    n = int(os.environ.get("CEDM_BENCH_THREADS", "1")) if n is None else n
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(saved)
