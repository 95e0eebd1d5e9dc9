"""Stats are written by generation threads and read by API threads at once: they must stay consistent."""

from __future__ import annotations

import threading

from lib_memslice.stats import CallRecord, JobSummary, Stats


def record(slices=1, retries=0, peak=10, site="s"):
    return CallRecord(site, "auto", "einsum", 16, 64, 64, 8, 16, 64, slices, peak, 100, retries)


def test_bounded_and_ordered():
    stats = Stats(capacity=5)
    for i in range(12):
        stats.record(record(slices=i + 1))
    recent = stats.recent()
    assert [r.slices for r in recent] == [8, 9, 10, 11, 12]
    assert [r.slices for r in stats.recent(2)] == [11, 12] and stats.recent(0) == []


def test_job_summary_and_infotext():
    stats = Stats()
    stats.start_job()
    for slices, retries in ((1, 0), (8, 1), (4, 1)):
        stats.record(record(slices=slices, retries=retries, peak=slices * 100))
    job = stats.finish_job()
    assert (job.calls, job.sliced_calls, job.max_slices, job.retries, job.max_peak_bytes) == (3, 2, 8, 2, 800)
    assert job.infotext() == "auto, max 8 slices, 2 OOM retries"
    assert "8 slices max" in job.line() and "2 retries" in job.line()
    assert stats.last_job == job and stats.current_job() == JobSummary()


def test_concurrent_writers_and_readers_stay_consistent():
    stats = Stats(capacity=10_000)
    n_threads, per_thread = 8, 500
    stop = threading.Event()
    seen_inconsistent = []

    def writer(t):
        for i in range(per_thread):
            stats.record(record(slices=1 + (i % 7), retries=i % 2, site=f"t{t}"))

    def reader():
        while not stop.is_set():
            job = stats.current_job()
            if job.sliced_calls > job.calls:
                seen_inconsistent.append(job)
            stats.recent(50)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    total = n_threads * per_thread
    assert stats.total_calls == total == len(stats.recent())
    assert stats.total_retries == n_threads * (per_thread // 2)
    job = stats.finish_job()
    assert job.calls == total and job.max_slices == 7 and not seen_inconsistent
    for t in range(n_threads):
        assert sum(r.site == f"t{t}" for r in stats.recent()) == per_thread


def test_no_wording_says_one_band_and_a_failed_job_says_what_stopped_it():
    """A pass streamed through the device in one band reads ``streamed`` (one band on the device is never planned:
    it would be the whole pass); a job closed by an error says so after its numbers."""
    from lib_memslice.band_costs import band_count
    from lib_memslice.job_plan import band_words

    job = JobSummary(strategy="auto", decode_bands=1, decode_streamed=True, encode_bands=3, encode_streamed=True)
    assert job.banded() == ["VAE decode streamed", "VAE encode in 3 bands streamed"]
    assert job.infotext() == "auto, max 0 slices, VAE decode streamed, VAE encode in 3 bands streamed"
    assert [band_count(n, s) for n, s in ((0, False), (1, True), (2, False), (4, True))] == [
        "untiled", "streamed", "2 bands", "4 bands streamed"]  # fmt: skip
    assert band_words(1, True) == "streamed through host memory" and band_words(8, False) == "in 8 bands"
    stats = Stats()
    stats.start_job()
    stats.record(record(slices=4))
    failed = stats.finish_job("not enough memory for the VAE encode")
    assert failed.line().endswith("; failed: not enough memory for the VAE encode")
    assert stats.last_job == failed and failed.error and stats.finish_job().error == ""


def test_noted_records_are_folded_in_by_every_read_in_order_and_into_the_job_they_ran_in():
    """The webui's attention calls note their records (a bound list append); every read folds them in first, and
    a job's start folds what was noted before it into the job before, never into the new one."""
    stats = Stats(capacity=4)
    stats.start_job("auto")
    for i in range(3):
        stats.note(record(slices=i + 1, retries=i, site=f"a{i}"))
    assert [r.site for r in stats.recent()] == ["a0", "a1", "a2"]  # a read folds them in, in order
    stats.note(record(slices=9, peak=900, site="b"))
    job = stats.current_job()
    assert (job.calls, job.max_slices, job.max_peak_bytes, job.retries) == (4, 9, 900, 3)
    assert (stats.total_calls, stats.total_retries) == (4, 3)
    stats.note(record(slices=5, site="late"))  # noted before the next job starts: the job it ran in
    stats.start_job("auto")
    assert stats.current_job().calls == 0 and stats.recent(1)[0].site == "late"
    stats.note(record(site="c"))
    stats.record(record(site="d"))  # a record folds in what was noted before it
    assert [r.site for r in stats.recent()] == ["b", "late", "c", "d"]  # bounded, as records are
    done = stats.finish_job()
    assert done.calls == 2 and stats.total_calls == 7


def test_records_noted_while_others_read_are_all_folded_in_once():
    stats = Stats(capacity=100_000)
    stop = threading.Event()
    n = 20_000

    def reader():
        while not stop.is_set():
            stats.current_job()
            stats.recent(5)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(n):
        stats.note(record(site=str(i)))
    stop.set()
    for t in readers:
        t.join()
    assert stats.total_calls == n and [r.site for r in stats.recent()] == [str(i) for i in range(n)]
