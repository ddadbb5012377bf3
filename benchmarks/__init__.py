"""Speed benchmarks (`make bench`); see __main__.py for the row format."""
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
