"""A warm interpreter that runs scripts in forks of itself, for `conftest.run_script`.

Every script starts by importing torch, transformers and lightarch: 4-8 s of the suite's CPU per script run, and the
suite runs scripts well over a hundred times. This process imports them once (and runs no torch op, so no OpenMP
thread exists to break a fork); each request is then a `fork()` whose child runs the script exactly as `python
scripts/<name>.py ARGS` would (`runpy.run_path` as `__main__`, its own argv, cwd, sys.path[0] and output files), so
every run is still its own process with its own state. Nothing imports a script: runpy executes it.

Protocol (JSON lines): request {"argv": [...], "cwd": ..., "env": {...}, "stdout": path, "stderr": path} on stdin
(conftest sends here only runs whose import-time environment matches this process's); replies
{"pid": child} then {"returncode": code} on stdout. The process exits when stdin closes.
"""

import atexit
import json
import os
import runpy
import sys
import traceback

import accelerate  # noqa: F401  (the imports scripts start with, done once)
import torch  # noqa: F401
import transformers  # noqa: F401

import lightarch  # noqa: F401
import lightarch.data  # noqa: F401
import lightarch.evaluation  # noqa: F401
import lightarch.training  # noqa: F401


def run_child(request: dict) -> int:
    """In the fork: become `python <argv>` and return its exit code (SystemExit's, 1 on an uncaught error)."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdin = open(0, closefd=False)
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python path/to/script.py` sets it
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        if isinstance(stop.code, int) or stop.code is None:
            code = stop.code or 0
        else:  # sys.exit("message"): printed to stderr, exit 1, as the interpreter does
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught error: the traceback and exit code 1, as the interpreter does
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what a normal interpreter exit runs (temporary folders, loggers)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def main() -> None:
    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w")
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                requests.close()
                replies.close()
                code = run_child(request)
            finally:
                os._exit(code)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
