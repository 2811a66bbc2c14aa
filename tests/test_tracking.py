"""Progress off a terminal: whole lines with the step, its rate and the time left, written at least every interval
even while one step runs long (a pipe read line by line, a SLURM log)."""
import time

from rlhf_ds.tracking import LineProgress


def test_a_slow_step_still_prints_a_line_every_interval(capsys):
    bar = LineProgress(total=4, desc="SFT", interval=0.2)
    time.sleep(0.75)  # step 1 takes long: the timer thread speaks up
    waiting = capsys.readouterr().out.splitlines()
    assert len(waiting) >= 2 and all(line.startswith("SFT: 0/4 steps |") for line in waiting)
    assert "step 1 running" in waiting[-1]
    bar.update(1)
    bar.set_postfix(loss="0.52")
    time.sleep(0.3)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("SFT: 1/4 steps |") and "s/step" in line and "left" in line and "loss=0.52" in line
    bar.update(3)
    bar.close()
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("SFT: 4/4 steps |") and "left" not in last
    time.sleep(0.3)
    assert capsys.readouterr().out == ""  # closed: silent
