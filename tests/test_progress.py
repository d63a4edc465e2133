"""Progress output: a tqdm bar on a terminal, plain periodic log lines with rate and ETA otherwise."""

import logging

from mmfm_jax.utils import LogProgress, progress


def test_not_a_tty_gives_log_lines(caplog):
    caplog.set_level(logging.INFO, logger="mmfm_jax")
    bar = progress(total=4, desc="work", disable=False, every_s=0.0)  # pytest's stderr is not a terminal
    assert isinstance(bar, LogProgress)
    for i in range(3):
        if i == 2:
            bar.set_postfix(ll="-1.5")
        bar.update(1)
    bar.close()  # nothing new since the last line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[0].startswith("work: 1/4 (25%), ") and "it/s, ETA 0:00:0" in lines[0]
    assert lines[-1].startswith("work: 3/4 (75%)") and lines[-1].endswith("[ll=-1.5]")
    caplog.clear()
    assert list(progress(range(5), desc="it", disable=False, every_s=3600.0)) == list(range(5))
    (line,) = [r.getMessage() for r in caplog.records]  # only the final line
    assert line.startswith("it: 5/5 (100%)") and "elapsed" in line


def test_disabled_is_silent(caplog):
    caplog.set_level(logging.INFO, logger="mmfm_jax")
    for _ in progress(range(3), desc="x", disable=True):
        pass
    assert not caplog.records
