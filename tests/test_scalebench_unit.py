"""The closing lines of ``make bench-scale`` (jobmesh.dev.scalebench.summary): pure arithmetic."""

from jobmesh.dev.scalebench import Window, summary


def _windows(rates: list[float], binder: list[float], jobs: list[int] | None = None) -> list[Window]:
    sizes = jobs or [100_000] * len(rates)
    return [Window(n, n / r, 0, {"binder": mb, "tracker": 55.0}) for r, mb, n in zip(rates, binder, sizes, strict=True)]


def test_the_last_window_is_compared_with_the_first():
    lines = summary(_windows([1000, 900, 800], [70, 80, 80]))
    assert lines[0] == (
        "throughput: first window 1000 jobs/s, last 800 jobs/s: last/first 0.80 (target >= 0.77, within 1.3x)"
    )


def test_memory_growth_is_per_100000_jobs_from_the_first_and_the_middle_window():
    lines = summary(_windows([1000] * 5, [70, 80, 82, 82, 84]))
    # window 1 to 5: +14 MiB over 400,000 jobs; window 3 to 5: +2 MiB over 200,000.
    assert lines[1] == "memory growth from window 1 to 5, MiB per 100,000 finished jobs: binder +3.5, tracker +0.0"
    assert lines[2] == "memory growth from window 3 to 5, MiB per 100,000 finished jobs: binder +1.0, tracker +0.0"


def test_one_window_has_no_growth_line():
    assert len(summary(_windows([1000], [70]))) == 1


def test_a_shorter_last_window_counts_only_its_own_jobs():
    # 100,000 + 50,000 jobs after window 1, +15 MiB: +10 MiB per 100,000.
    lines = summary(_windows([1000] * 3, [70, 80, 85], [100_000, 100_000, 50_000]))
    assert lines[1] == "memory growth from window 1 to 3, MiB per 100,000 finished jobs: binder +10.0, tracker +0.0"
    assert lines[2] == "memory growth from window 2 to 3, MiB per 100,000 finished jobs: binder +10.0, tracker +0.0"
