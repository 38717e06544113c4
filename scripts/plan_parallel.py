#!/usr/bin/env python
"""Plan multi-GPU training on paper (the library: lightarch.training.parallel.planner): memory per GPU, compute,
communication volume and time per step for DDP, ZeRO-1/2/3, FSDP, TP, PP (GPipe bubble), EP and 3D, with and
without overlap, and the predicted scaling efficiency against GPU count. Predictions, not measurements: the
assumptions are in the planner's docstring, and the model is not calibrated against measured step times.

The model is a lightarch preset (`--preset tiny --config_overrides ...`, built on the meta device: no memory) or
raw counts (`--num_parameters 175e9 --num_layers 96 --hidden_size 12288`). Writes into --output_dir:

    plan.json        inputs, one plan per strategy, the efficiency curves
    plan.md          the strategies as a markdown table (also printed)
    efficiency.png   predicted scaling efficiency vs GPU count (ZeRO-1 and ZeRO-3, overlap on / off)

    python scripts/plan_parallel.py --num_parameters 175e9 --num_layers 96 --hidden_size 12288 \\
        --num_attention_heads 96 --num_gpus 1000 --mfu 0.44 --micro_batch_size 2 --micro_batches 4 --recompute
    python scripts/plan_parallel.py --preset hybrid-long --num_gpus 64 --inter_bandwidth_gbs 50
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class PlanArguments:
    preset: str = field(default="", metadata={"help": "SparseMoeConfig preset (e.g. tiny, hybrid-long); empty: "
                                                      "use --num_parameters etc."})
    config_overrides: str = field(default="", metadata={"help": "Config fields over the preset, 'key=value,...'."})
    num_parameters: float = field(default=0.0, metadata={"help": "Total parameters (without --preset), e.g. 175e9."})
    num_layers: int = field(default=0, metadata={"help": "Decoder layers (without --preset)."})
    hidden_size: int = field(default=0, metadata={"help": "Hidden size (without --preset)."})
    num_attention_heads: int = field(default=32, metadata={"help": "Attention heads (without --preset)."})
    num_gpus: int = field(default=1000, metadata={"help": "GPUs in the cluster (the strategy table)."})
    gpus_per_node: int = field(default=8, metadata={"help": "GPUs per node (TP stays inside a node)."})
    memory_gb: float = field(default=80.0, metadata={"help": "Memory per GPU, GB."})
    peak_tflops: float = field(default=312.0, metadata={"help": "Peak TFLOP/s per GPU (bf16 dense)."})
    mfu: float = field(default=0.45, metadata={"help": "Fraction of peak the compute reaches."})
    intra_bandwidth_gbs: float = field(default=150.0, metadata={"help": "Intra-node bandwidth per GPU, GB/s."})
    inter_bandwidth_gbs: float = field(default=25.0, metadata={"help": "Inter-node bandwidth per GPU, GB/s."})
    intra_latency_us: float = field(default=3.0, metadata={"help": "Intra-node latency per message, us."})
    inter_latency_us: float = field(default=10.0, metadata={"help": "Inter-node latency per message, us."})
    sequence_length: int = field(default=2048, metadata={"help": "Tokens per sequence."})
    micro_batch_size: int = field(default=1, metadata={"help": "Sequences per micro-batch per data-parallel rank."})
    micro_batches: int = field(default=8, metadata={"help": "Micro-batches per step (accumulation / PP)."})
    recompute: bool = field(default=False, metadata={"help": "Full activation recomputation."})
    gpu_counts: str = field(default="8,16,32,64,128,256,512,1000,2048,4096",
                            metadata={"help": "GPU counts of the efficiency curve, comma-separated."})
    output_dir: str = field(default="outputs/plan_parallel", metadata={"help": "Where plan.json/md/png go."})


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(PlanArguments, description=__doc__.split("\n\n")[0])
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from lightarch.training.checkpoints import prepare_output_dir, write_atomically
    from lightarch.training.parallel.planner import (
        GB,
        BatchSpec,
        ClusterSpec,
        ModelSpec,
        model_spec_from_config,
        planning_report,
        plot_efficiency,
    )

    try:
        if args.preset:
            from lightarch.configuration import SparseMoeConfig
            from lightarch.training.cli import config_from_preset

            model = model_spec_from_config(config_from_preset(SparseMoeConfig, args.preset, args.config_overrides))
        elif args.num_parameters > 0 and args.num_layers > 0 and args.hidden_size > 0:
            model = ModelSpec(num_parameters=args.num_parameters, num_layers=args.num_layers,
                              hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads)
        else:
            raise ValueError("give --preset NAME, or --num_parameters, --num_layers and --hidden_size (all > 0).")
        cluster = ClusterSpec(
            num_gpus=args.num_gpus, gpus_per_node=args.gpus_per_node, memory_bytes=args.memory_gb * GB,
            peak_flops=args.peak_tflops * 1e12, mfu=args.mfu, intra_bandwidth=args.intra_bandwidth_gbs * GB,
            inter_bandwidth=args.inter_bandwidth_gbs * GB, intra_latency=args.intra_latency_us * 1e-6,
            inter_latency=args.inter_latency_us * 1e-6)
        batch = BatchSpec(sequence_length=args.sequence_length, micro_batch_size=args.micro_batch_size,
                          micro_batches=args.micro_batches, recompute=args.recompute)
        try:
            gpu_counts = [int(n) for n in args.gpu_counts.split(",") if n.strip()]
        except ValueError:
            raise ValueError(f"--gpu_counts {args.gpu_counts!r}: write integers separated by commas, e.g. 8,64,512.")
        if not gpu_counts or min(gpu_counts) < 1:
            raise ValueError(f"--gpu_counts {args.gpu_counts!r}: give at least one GPU count >= 1.")
        output_dir = prepare_output_dir(args.output_dir, script="plan_parallel", keep=())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import json

    report = planning_report(model, cluster, batch, gpu_counts)
    write_atomically(output_dir / "plan.json", json.dumps(report, indent=1))
    write_atomically(output_dir / "plan.md", report["markdown"] + "\n")
    write_atomically(output_dir / "efficiency.png", plot_efficiency(report["curves"]))
    print(report["markdown"])
    print(f"wrote {output_dir}/plan.json, plan.md, efficiency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
