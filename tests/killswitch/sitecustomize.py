"""On ``PYTHONPATH`` for a kill test: with $ALFLOW_TEST_DIE_AFTER_LABEL = N set, the process (the
runner, or a worker) kills itself (SIGKILL) right after its Nth Label task has paid for its
oracle call and written the result to its launch directory, before FireWorks records it; once
only, over all processes ($ALFLOW_TEST_DIE_MARKER). FireWorks is not imported here (the runner
selects its store first): the hook is on the result file's writer."""

import os

if os.environ.get("ALFLOW_TEST_DIE_AFTER_LABEL"):
    import signal
    from pathlib import Path

    from alflow.store import embedded

    _write, _done = embedded.write_atomically, []

    def write_atomically(path, text):
        _write(path, text)
        if Path(path).name != "label_result.json":
            return
        _done.append(1)
        marker = Path(os.environ["ALFLOW_TEST_DIE_MARKER"])
        if len(_done) == int(os.environ["ALFLOW_TEST_DIE_AFTER_LABEL"]) and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    embedded.write_atomically = write_atomically
