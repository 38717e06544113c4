"""Launches past one process, on this machine (gloo): two simulated torchrun nodes of two processes each, the shipped
accelerate CPU config, and training under the models' tensor- / expert-parallel plans; each equals one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT_ROOT, free_port, port_was_taken

# the README's `-n 2 --dist loadgroup` runs this module on one xdist worker, so its module-scoped launch runs once
pytestmark = pytest.mark.xdist_group("test_parallel_multinode")

CONFIGS = PROJECT_ROOT / "modeling" / "training" / "parallel" / "configs"
LAUNCH_TIMEOUT_SECONDS = 240  # a hung rendezvous or collective fails the test instead of blocking the suite
STEPS = 10


def launch(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start every command at once (one per simulated node), wait for all; on a timeout kill each launcher's process
    group (its own session: the launcher and the workers it started), so no worker outlives the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True) for command in commands]
    results, deadline = [], time.monotonic() + LAUNCH_TIMEOUT_SECONDS  # one deadline for all of them
    try:
        for command, process in zip(commands, processes):
            stdout, stderr = process.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return results


def launch_until_started(make_commands) -> None:
    """`launch(make_commands(port))`, once more on a new port only if the first launch could not bind its port."""
    errors = []
    for _attempt in range(2):
        results = launch(make_commands(free_port()))
        if all(result.returncode == 0 for result in results):
            return
        failed = [result.stderr for result in results if result.returncode != 0]
        errors += [stderr[-3000:] for stderr in failed]
        if not any(port_was_taken(stderr) for stderr in failed):
            break
    raise AssertionError("\n----\n".join(errors))


def read_ranks(folder: Path, prefix: str, world_size: int) -> list[dict]:
    return [json.loads((folder / f"{prefix}-rank{rank}.json").read_text()) for rank in range(world_size)]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> list[dict]:
    """`torchrun --nnodes 2 --nproc_per_node 2 --node_rank {0,1}` (static rendezvous on 127.0.0.1): FSDP2 parity."""
    out = tmp_path_factory.mktemp("two_nodes")

    def commands(port: int) -> list[list[str]]:
        return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                 "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                 "-m", "lightarch.training.parallel.parity", str(out), "--steps", str(STEPS),
                 "--cases", "sparse_moe_top_k/fsdp2"] for node in (0, 1)]

    launch_until_started(commands)
    return read_ranks(out, "parity", 4)


def test_two_simulated_nodes_form_one_world(two_nodes):
    assert [rank["rank"] for rank in two_nodes] == [0, 1, 2, 3]
    assert {rank["world_size"] for rank in two_nodes} == {4}
    # static rendezvous: node 0 holds global ranks 0-1, node 1 ranks 2-3
    assert [(rank["node_rank"], rank["local_rank"]) for rank in two_nodes] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_fsdp2_over_two_nodes_equals_one_process(two_nodes):
    for rank in two_nodes:
        result = rank["cases"]["sparse_moe_top_k/fsdp2"]
        assert len(result["losses"]) == STEPS
        assert result["loss_max_diff"] < 1e-5, result
        assert result["grad_max_rel"] < 1e-5, result  # every parameter's full gradient, every step
        assert result["bias_max_diff"] == 0.0 and result["biases_moved"]  # the bias update saw all 4 ranks' loads
        assert result["held_parameters"] <= 0.25 + 0.02  # sharded over 4 ranks, not 2
        assert result["held_optimizer_state"] <= 0.25 + 0.02
        assert result["zero_token_layer_steps"] == 2 * STEPS  # the last rank leaves experts idle in both MoE layers


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory) -> list[dict]:
    """`accelerate launch --config_file configs/accelerate_cpu.yaml -m ...accelerate_trainer` (2 processes)."""
    out = tmp_path_factory.mktemp("accelerate")

    def commands(port: int) -> list[list[str]]:
        return [[sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(CONFIGS / "accelerate_cpu.yaml"), "--main_process_port", str(port),
                 "-m", "lightarch.training.parallel.accelerate_trainer", str(out), "--steps", str(STEPS)]]

    launch_until_started(commands)
    return read_ranks(out, "accelerate", 2)


def test_accelerate_launch_trains_a_lightarch_trainer_like_one_process(accelerate_run):
    for rank in accelerate_run:
        assert rank["launched_by_accelerate"]
        assert (rank["world_size"], rank["accelerate_processes"]) == (2, 2)
        assert (rank["distributed_type"], rank["backend"]) == ("MULTI_CPU", "gloo")
        assert rank["wrapper"] == "DistributedDataParallel"  # DDP: no sharding is claimed on this path
        assert len(rank["losses"]) == STEPS
        assert rank["loss_max_diff"] < 1e-5, rank
        assert rank["bias_max_diff"] == 0.0 and rank["biases_moved"]


def test_accelerate_configs_launch_processes_on_a_cpu_machine():
    """MULTI_CPU would start one process and expect mpirun; MULTI_GPU + use_cpu makes accelerate start them all."""
    one, several = (yaml.safe_load((CONFIGS / name).read_text())
                    for name in ("accelerate_cpu.yaml", "accelerate_cpu_multinode.yaml"))
    for config in (one, several):
        assert (config["distributed_type"], config["use_cpu"], config["mixed_precision"]) == ("MULTI_GPU", True, "no")
        assert "fsdp_config" not in config and "parallelism_config" not in config  # refused or ignored on CPU
    assert (one["num_machines"], one["num_processes"]) == (1, 2)
    assert (several["num_machines"], several["num_processes"], several["same_network"]) == (2, 4, True)


PLAN_CASES = [f"{kind}/{engine}" for kind in ("sparse_moe_shared_qk_norm", "sparse_moe_top_p")
              for engine in ("tp", "ep")]


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> list[dict]:
    """`from_pretrained(..., DistributedConfig(tp_plan="auto", tp_size=2[, ep_size=2]))` trained for 10 steps."""
    out = tmp_path_factory.mktemp("plans")

    def commands(port: int) -> list[list[str]]:
        return [[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(port), "-m", "lightarch.training.parallel.parity", str(out), "--steps",
                 str(STEPS), "--cases", ",".join(PLAN_CASES)]]

    launch_until_started(commands)
    return read_ranks(out, "parity", 2)


@pytest.mark.parametrize("case", PLAN_CASES)
def test_tensor_and_expert_parallel_training_equals_one_process(plans, case):
    for rank in plans:
        result = rank["cases"][case]
        assert len(result["losses"]) == STEPS
        assert result["unchecked_parameters"] == []  # every parameter of the one-process model was compared
        assert result["loss_max_diff"] < 1e-5, result
        assert result["grad_max_rel"] < 1e-5, result  # QK norms (grad all-reduce), shared expert, router included
        # tp: every expert, half of its gate/up rows; ep: 2 of the 4 experts, whole
        assert result["experts_local_shape"] == ([4, 16, 32] if case.endswith("/tp") else [2, 32, 32])
        assert result["held_parameters"] < 0.55 and result["held_optimizer_state"] < 0.55
        if case.startswith("sparse_moe_shared_qk_norm"):  # top-k with the aux-loss-free bias update
            assert result["bias_max_diff"] == 0.0 and result["biases_moved"]
