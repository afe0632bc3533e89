"""`WorkQueue`: every index handed out once across threads, the first error kept and stopping the rest."""

import threading

import pytest

from bema_offline.engine.workqueue import WorkQueue


def test_every_item_is_taken_once_by_concurrent_workers_and_progress_adds_up():
    reported = []
    queue = WorkQueue(1000, lambda nbytes, ntensors: reported.append((nbytes, ntensors)))
    taken = [[] for _ in range(4)]

    def work(mine):
        while (index := queue.take()) is not None:
            mine.append(index)
            queue.progress(index, 1)

    threads = [threading.Thread(target=work, args=(mine,)) for mine in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(i for mine in taken for i in mine) == list(range(1000))
    assert sum(n for n, _ in reported) == sum(range(1000)) and len(reported) == 1000
    queue.raise_error()  # none


def test_the_first_error_is_kept_and_stops_the_queue():
    queue = WorkQueue(10)
    assert queue.take() == 0
    queue.fail(ValueError("first"))
    queue.fail(KeyError("second"))
    assert queue.take() is None
    with pytest.raises(ValueError, match="first"):
        queue.raise_error()
