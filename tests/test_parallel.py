"""Tensor and expert parallelism through transformers' plans: 2 CPU processes (gloo) match one process."""

import json
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, tiny_sparse_moe_config, torchrun

from lightarch import SparseMoeForCausalLM


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = tiny_sparse_moe_config(num_shared_experts=1, first_k_dense_layers=1, use_qk_norm=True,
                                    initializer_range=0.2)
    model = SparseMoeForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("parallel")
    model.save_pretrained(folder)
    input_ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        torch.save({"input_ids": input_ids, "logits": model(input_ids).logits}, folder / "reference.pt")
    return folder


@pytest.mark.parametrize("mode", ["tensor_parallel", "expert_parallel"])
def test_parallel_plans_match_a_single_process(saved_model, mode):
    torchrun(str(PROJECT_ROOT / "tests" / "parallel_worker.py"), mode, str(saved_model))
    ranks = [json.loads((saved_model / f"{mode}-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(rank["rank"] for rank in ranks) == [0, 1]
    for rank in ranks:
        assert rank["max_abs_diff"] < 1e-5, rank
        assert rank["q_proj_shape"] == [16, 32]  # 4 heads x 8 dims split over 2 ranks
        if mode == "expert_parallel":
            assert rank["experts_shape"][0] == 2  # 4 experts, 2 per rank
        else:
            assert rank["experts_shape"] == [4, 16, 32]  # every expert, half of its gate/up rows
