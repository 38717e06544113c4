"""Shared fixtures: tiny configs so every test runs in seconds on 2 CPU cores, with no hub access."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads crawl on a shared CPU

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # lightarch itself is imported as installed (pip install -e .)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightarch  # noqa: E402,F401  (registers the Auto classes)
from lightarch import SparseMoeConfig  # noqa: E402


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def script_env(threads: int | None = 1) -> dict[str, str]:
    """The environment scripts run in: offline, `threads` OpenMP threads (None: the machine's), no progress bars."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


class ScriptZygote:
    """tests/script_zygote.py, started once per test process: runs a script in a fork of an interpreter that has
    imported torch / transformers / lightarch already (that module's docstring says why and how)."""

    def __init__(self) -> None:
        self.env = script_env(threads=1)
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("script_zygote.py"))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env,
                                        cwd=PROJECT_ROOT)

    def run(self, argv: list[str], cwd: str | os.PathLike, timeout: float, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="lightarch-script-") as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            request = {"argv": argv, "cwd": str(Path(cwd).resolve()), "stdout": str(out), "stderr": str(err),
                       "env": env or self.env}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = json.loads(self.process.stdout.readline())["pid"]
            timer = threading.Timer(timeout, os.kill, (pid, signal.SIGKILL))
            timer.start()
            try:
                code = json.loads(self.process.stdout.readline())["returncode"]
            finally:
                timed_out = not timer.is_alive()
                timer.cancel()
            stdout, stderr = (path.read_text(errors="replace") for path in (out, err))
        if timed_out and code == -signal.SIGKILL:
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
        return subprocess.CompletedProcess(argv, code, stdout, stderr)


_zygote: ScriptZygote | None = None

# Variables read when the interpreter or a library starts (OpenMP and BLAS at load, huggingface_hub / transformers /
# tqdm at import): the warm interpreter has them already, so a run that changes one of them gets a fresh interpreter.
# Any other variable is set in the fork before the script runs.
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_",
                   "TQDM_", "PYTHON", "LD_", "CUDA_", "TOKENIZERS_")


def _fork_can_run(env: dict[str, str], warm_env: dict[str, str]) -> bool:
    changed = {key for key in set(env) | set(warm_env) if env.get(key) != warm_env.get(key)}
    return not any(key.startswith(IMPORT_TIME_ENV) for key in changed)


def run_script(name: str, *args: str, cwd: str | os.PathLike = PROJECT_ROOT, threads: int | None = 1
               ) -> subprocess.CompletedProcess:
    """`python scripts/<name>.py ARGS` as a user runs it, in a new process (offline, `threads` OpenMP threads, no
    progress bars); nothing imports a script. With one thread and the import-time environment the suite started with,
    the process is a fork of a warm interpreter (`ScriptZygote`); otherwise a fresh interpreter."""
    global _zygote
    argv, env = [str(PROJECT_ROOT / "scripts" / f"{name}.py"), *args], script_env(threads)
    if _zygote is None and threads == 1 and hasattr(os, "fork"):
        _zygote = ScriptZygote()
    if _zygote is not None and _fork_can_run(env, _zygote.env) and _zygote.process.poll() is None:
        return _zygote.run(argv, cwd, env=env, timeout=600)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def tiny_sparse_moe_config(**overrides) -> SparseMoeConfig:
    """A 3-layer hybrid (sliding, full, sliding) SparseMoe with 4 experts; override any field."""
    values = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_experts_per_token=3,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return SparseMoeConfig(**values)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models (restored after it): they gain nothing from a second thread,
    and spinning OpenMP threads are very slow on busy cores. Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_BLOCK_LIGHTARCH = """
import importlib.abc, sys
class BlockLightarch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("configuration", "modeling", "lightarch"):
            raise ImportError("lightarch is not installed here: " + name)
sys.meta_path.insert(0, BlockLightarch())
"""


def run_without_lightarch(script: str, tmp_path: Path) -> None:
    """Run `script` in a new interpreter outside the project, where `lightarch` (and the repository folders `configuration` / `modeling`) cannot be imported:
    a user loading a saved folder through remote code. The script must print REMOTE-CODE-OK at its end."""
    import subprocess
    import textwrap

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules_cache"), OMP_NUM_THREADS="1")
    source = _BLOCK_LIGHTARCH + textwrap.dedent(script)
    result = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-CODE-OK" in result.stdout


# ---- torchrun launches ---------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may still take it before torchrun binds it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_was_taken(stderr: str) -> bool:
    """A launch that failed because its rendezvous port was taken between `free_port()` and the bind (torch's
    TCPStore: "EADDRINUSE ... address already in use"): the one failure worth launching again."""
    text = stderr.lower()
    return "eaddrinuse" in text or "address already in use" in text


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> None:
    """`python -m torch.distributed.run --nproc_per_node NPROC` on 127.0.0.1 with one thread per process, the hub off
    and the project importable. Launched a second time on a new port only if the first launch could not bind its
    port; any other failure fails the test at once with the launcher's stderr (a silent retry doubled an 80 s run)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT), HF_HUB_OFFLINE="1")
    errors = []
    for _attempt in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), *args]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode == 0:
            return
        errors.append(result.stderr[-3000:])
        if not port_was_taken(result.stderr):
            break
    raise AssertionError("torchrun failed:\n" + "\n----\n".join(errors))
