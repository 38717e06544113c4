"""Run by tests/test_parallel.py under torchrun: load a saved SparseMoe with a parallel plan, print what each rank holds."""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import lightarch  # noqa: F401


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def main(mode: str, folder: str) -> None:
    reference = torch.load(f"{folder}/reference.pt")
    if mode == "tensor_parallel":
        config = DistributedConfig(tp_plan="auto", tp_size=2)
    else:
        config = DistributedConfig(tp_plan="auto", tp_size=2, ep_size=2)
    model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=config).eval()
    with torch.no_grad():
        logits = model(reference["input_ids"]).logits
    moe_layer = model.model.layers[-1]
    result = json.dumps({
        "rank": dist.get_rank(),
        "max_abs_diff": (logits - reference["logits"]).abs().max().item(),
        "experts_shape": list(local(moe_layer.mlp.experts.gate_up_proj).shape),
        "q_proj_shape": list(local(moe_layer.self_attn.q_proj.weight).shape),
    })
    with open(f"{folder}/{mode}-rank{dist.get_rank()}.json", "w") as f:  # ranks' stdout lines interleave
        f.write(result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
