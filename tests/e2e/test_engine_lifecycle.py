"""`pdserve.Engine` lifecycle: a script that never calls shutdown() exits promptly (the
engine stops itself at interpreter exit, scheduler process included), and an engine
used after shutdown raises a clear RuntimeError instead of blocking forever."""

import os
import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent("""
    import atexit, sys, time
    import pdserve

    def after_engine_exit_hook():  # registered first, so it runs after the engine's hook
        try:
            engine.generate("hi", {"max_new_tokens": 1})
            print("NO-ERROR", flush=True)
        except RuntimeError as e:
            print("RAISED:", e, flush=True)
        print("EXITING", flush=True)

    atexit.register(after_engine_exit_hook)
    engine = pdserve.Engine(dtype="float32", max_total_tokens=2048)
    print("SCHEDULER", engine.tm.proc.pid, flush=True)
    out = engine.generate("The capital of France is", {"max_new_tokens": 2, "temperature": 0})
    print("GENERATED", len(out["output_ids"]), flush=True)
    # no shutdown(): the interpreter exits here
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_engine_without_shutdown_exits_and_use_after_shutdown_raises(tmp_path):
    script = tmp_path / "no_shutdown.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the script did not exit (hang at interpreter exit?)\n{out}\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    assert "GENERATED 2" in out, out + err[-3000:]
    assert "RAISED:" in out and "shut down" in out, out
    assert "EXITING" in out
    assert "Task was destroyed" not in err, err[-3000:]
    sched = int(out.split("SCHEDULER", 1)[1].split()[0])
    deadline = time.time() + 10
    while _alive(sched) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(sched), "the scheduler process outlived the script"
