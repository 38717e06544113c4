"""`conftest.run_script` runs scripts in forks of a warm interpreter (tests/script_zygote.py): each run must still
look like `python path/to/script.py ARGS` in a new process (argv, cwd, sys.path[0], exit codes, output at the C level,
a timeout), and give what a fresh interpreter gives."""

import subprocess
import sys
import textwrap

import conftest
import pytest
from conftest import PROJECT_ROOT, run_script, script_env


def zygote() -> "conftest.ScriptZygote":
    run_script("select_model", "--help")  # starts it in this test process if nothing has yet
    assert conftest._zygote is not None and conftest._zygote.process.poll() is None
    return conftest._zygote


def test_a_forked_run_is_its_own_process_with_the_scripts_argv_cwd_and_path(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        print("argv", sys.argv[1:], "cwd", os.getcwd(), "path0", sys.path[0], "pid", os.getpid())
        os.write(2, b"C-level stderr\\n")
        sys.exit(3)
    """))
    (tmp_path / "work").mkdir()
    first = zygote().run([str(script), "a", "b c"], cwd=tmp_path / "work", timeout=60)
    second = zygote().run([str(script), "d"], cwd=tmp_path, timeout=60)
    assert first.returncode == 3 and second.returncode == 3
    assert f"argv ['a', 'b c'] cwd {tmp_path / 'work'} path0 {tmp_path}" in first.stdout
    assert "argv ['d']" in second.stdout and "C-level stderr" in first.stderr
    pids = {out.stdout.split("pid ")[1].strip() for out in (first, second)}
    assert len(pids) == 2 and str(zygote().process.pid) not in pids


def test_exit_messages_uncaught_errors_and_timeouts_are_the_interpreters(tmp_path):
    message, error, slow = (tmp_path / name for name in ("message.py", "error.py", "slow.py"))
    message.write_text("import sys\nsys.exit('stopped: --x is wrong')\n")
    error.write_text("raise ValueError('boom')\n")
    slow.write_text("import time\ntime.sleep(30)\n")
    stopped = zygote().run([str(message)], cwd=tmp_path, timeout=60)
    assert stopped.returncode == 1 and "stopped: --x is wrong" in stopped.stderr
    failed = zygote().run([str(error)], cwd=tmp_path, timeout=60)
    assert failed.returncode == 1 and "Traceback" in failed.stderr and "ValueError: boom" in failed.stderr
    with pytest.raises(subprocess.TimeoutExpired):
        zygote().run([str(slow)], cwd=tmp_path, timeout=1)
    assert zygote().run([str(message)], cwd=tmp_path, timeout=60).returncode == 1  # still serving


def test_a_real_script_gives_what_a_fresh_interpreter_gives(tmp_path):
    args = ["--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", str(tmp_path / "checkpoint-7")]
    forked = run_script("train_adaptive", *args)
    fresh = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "train_adaptive.py"), *args],
                           env=script_env(threads=1), capture_output=True, text=True, timeout=600)
    assert forked.returncode == fresh.returncode == 2
    error = [line for line in fresh.stderr.splitlines() if line.startswith("train_adaptive.py: error:")]
    assert error and error == [line for line in forked.stderr.splitlines() if line.startswith("train_adaptive.py")]


def test_the_fork_runs_in_the_runs_environment_and_import_time_changes_need_a_fresh_interpreter(tmp_path):
    script = tmp_path / "env.py"
    script.write_text("import os\nprint('probe', os.environ.get('LIGHTARCH_PROBE'), 'ppid', os.getppid())\n")
    warm = zygote()
    env = {**warm.env, "LIGHTARCH_PROBE": "set for this run"}
    result = warm.run([str(script)], cwd=tmp_path, env=env, timeout=60)
    assert f"probe set for this run ppid {warm.process.pid}" in result.stdout
    assert "probe None" in warm.run([str(script)], cwd=tmp_path, timeout=60).stdout  # not left behind
    assert conftest._fork_can_run(env, warm.env)
    for key, value in (("OMP_NUM_THREADS", "2"), ("HF_HUB_OFFLINE", "0"), ("TQDM_DISABLE", "0")):
        assert not conftest._fork_can_run({**warm.env, key: value}, warm.env), key
    assert not conftest._fork_can_run({k: v for k, v in warm.env.items() if k != "HF_HUB_OFFLINE"}, warm.env)
