"""A paper model of one training step under ZeRO-1/2/3, FSDP, tensor, pipeline and expert parallelism.

For a model (parameter counts, or a lightarch config built on the meta device), a cluster and a batch, `plan`
gives per device: memory (parameters, gradients, optimizer state, activations), compute time, communication volume
and time (with and without overlap), step time and the predicted scaling efficiency against a device that computes
the same per-device work with no communication and no pipeline bubble. `compare_strategies` and `scaling_curve`
tabulate it; `scripts/plan_parallel.py` is the command line.

Assumptions (every one is a field you can change):
- Mixed-precision Adam as in ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054, section 3.1): bf16/fp16 parameters
  (2 bytes) and gradients (2 bytes), fp32 master weights, momentum and variance (K = 12 bytes): 16 bytes/param.
  Per device (N = data-parallel degree): DDP 16Ψ; ZeRO-1 (P_os) 4Ψ + 12Ψ/N; ZeRO-2 (P_os+g) 2Ψ + 14Ψ/N;
  ZeRO-3 (P_os+g+p) and FSDP 16Ψ/N (+ the gathered bf16 parameters and gradients of `prefetch_layers` layers).
  The paper's Figure 1 (Ψ = 7.5B, N = 64, K = 12): 120 GB, 31.4 GB, 16.6 GB, 1.9 GB; `zero_paper_figure1()`
  reproduces it (tested).
- Communication volume (same paper, section 7): DDP / ZeRO-1 / ZeRO-2 move 2Ψ elements per device per step
  (reduce-scatter + all-gather, or all-reduce); ZeRO-3 / FSDP 3Ψ (parameter all-gather in forward and in backward,
  gradient reduce-scatter), in `grad_bytes`-byte elements. Ring collectives: an all-reduce of S bytes over n devices
  costs 2(n-1)/n S / bw + 2(n-1) latency; all-gather / reduce-scatter half of it. A group that spans nodes runs at
  the inter-node bandwidth per device, else at the intra-node one.
- Compute: `6 Ψ_active` FLOP per token (8 with full activation recomputation) at `peak_flops * mfu`.
- Tensor parallelism (Megatron, Shoeybi et al. 2019): 4 all-reduces of the layer activations (tokens x hidden,
  2 bytes) per layer per step (2 forward, 2 backward), on the critical path (never overlapped here).
- Pipeline parallelism (GPipe, Huang et al. 2019): bubble fraction (p-1)/(m+p-1) for p stages and m micro-batches;
  point-to-point activation sends between stages (forward and backward).
- Expert parallelism: 4 all-to-alls per MoE layer (dispatch and combine, forward and backward), each moving
  tokens x experts_per_token x hidden x 2 bytes x (e-1)/e per device.
- Overlap: data-parallel traffic (ZeRO / FSDP gathers and reductions) runs behind compute, except one layer's
  worth at the start and at the end of the step (the first gather, the last reduction); TP, EP and PP traffic does
  not overlap. Without overlap every communication adds to the step.
- Activations per layer per token: 34 h + 5 a s bytes (Korthikanti et al. 2022, no recomputation), divided by the
  TP degree; 2 h with full recomputation; with PP, each stage holds `min(m, p)` micro-batches in flight (1F1B).

The article's "92% scaling efficiency for ZeRO-3 on 1,000 GPUs" gives no setup; `article_zero3_point()` states one
(a 175B dense model; A100-80GB, 312 TFLOP/s bf16 peak at 44% MFU; 8 GPUs per node; 25 GB/s per GPU across
nodes (one 200 Gb/s HDR link per GPU, as in a DGX A100); 4 micro-batches of 2 x 2,048 tokens per GPU; full
recomputation; overlap on) under which the model predicts 93% (`article_zero3_point`). ZeRO-3's efficiency depends
on the ratio (peak x MFU) / (bandwidth x tokens per micro-batch) and sits near the knee of max(compute, comm)
there: 45% MFU gives 91%, 40% gives 99.8%. That is a consistency check of the model, not a measurement of anything.
The model is NOT calibrated against measured step times (issue 17 asks for it on 1/2/4 local processes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

GB = 1e9


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs of a model. `active_parameters` defaults to all (dense); MoE sets it lower."""

    num_parameters: float
    num_layers: int
    hidden_size: int
    num_attention_heads: int = 32
    active_parameters: float | None = None
    expert_parameters: float = 0.0  # the routed experts' share of num_parameters (sharded by EP)
    num_moe_layers: int = 0
    experts_per_token: float = 0.0

    def __post_init__(self):
        for name in ("num_parameters", "num_layers", "hidden_size", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelSpec.{name} must be > 0, got {getattr(self, name)}.")
        if not 0 <= self.expert_parameters <= self.num_parameters:
            raise ValueError(f"ModelSpec.expert_parameters must be in [0, num_parameters], got "
                             f"{self.expert_parameters}.")

    @property
    def active(self) -> float:
        return self.num_parameters if self.active_parameters is None else self.active_parameters


@dataclass(frozen=True)
class ClusterSpec:
    """Devices and links. Bandwidths are bytes/s per device in one direction; latencies seconds per message."""

    num_gpus: int
    gpus_per_node: int = 8
    memory_bytes: float = 80 * GB
    peak_flops: float = 312e12
    mfu: float = 0.45
    intra_bandwidth: float = 150 * GB
    inter_bandwidth: float = 25 * GB
    intra_latency: float = 3e-6
    inter_latency: float = 10e-6

    def __post_init__(self):
        for name in ("num_gpus", "gpus_per_node", "memory_bytes", "peak_flops", "intra_bandwidth",
                     "inter_bandwidth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClusterSpec.{name} must be > 0, got {getattr(self, name)}.")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"ClusterSpec.mfu is a fraction of peak in (0, 1], got {self.mfu}.")


@dataclass(frozen=True)
class BatchSpec:
    """Per data-parallel replica: `micro_batch_size` sequences x `micro_batches` (gradient accumulation / PP)."""

    sequence_length: int = 2048
    micro_batch_size: int = 1
    micro_batches: int = 1
    recompute: bool = False

    def __post_init__(self):
        for name in ("sequence_length", "micro_batch_size", "micro_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BatchSpec.{name} must be > 0, got {getattr(self, name)}.")

    @property
    def tokens_per_replica(self) -> int:
        return self.sequence_length * self.micro_batch_size * self.micro_batches


@dataclass(frozen=True)
class Layout:
    """How the cluster's devices are split. `zero_stage` 0 is DDP; `fsdp` is ZeRO-3 sharded per layer."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero_stage: int = 0
    name: str = ""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"Layout.zero_stage must be 0 (DDP), 1, 2 or 3, got {self.zero_stage}.")
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"Layout.{name} must be >= 1, got {getattr(self, name)}.")


@dataclass
class StepPlan:
    """One strategy's prediction per device (bytes, seconds); `efficiency` is the predicted scaling efficiency."""

    strategy: str
    num_gpus: int
    data_parallel: int
    memory: dict[str, float] = field(default_factory=dict)
    memory_total: float = 0.0
    fits: bool = True
    compute_time: float = 0.0
    bubble_fraction: float = 0.0
    comm_bytes: dict[str, float] = field(default_factory=dict)
    comm_time: dict[str, float] = field(default_factory=dict)
    step_time_overlap: float = 0.0
    step_time_no_overlap: float = 0.0
    efficiency_overlap: float = 0.0
    efficiency_no_overlap: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def model_states_bytes(num_parameters: float, data_parallel: int, zero_stage: int) -> dict[str, float]:
    """Parameters, gradients and optimizer state per device for mixed-precision Adam (2 + 2 + 12 bytes/param)."""
    if data_parallel < 1:
        raise ValueError(f"data_parallel must be >= 1, got {data_parallel}.")
    n = data_parallel
    params, grads, optimizer = 2 * num_parameters, 2 * num_parameters, 12 * num_parameters
    return {
        "parameters": params / n if zero_stage >= 3 else params,
        "gradients": grads / n if zero_stage >= 2 else grads,
        "optimizer": optimizer / n if zero_stage >= 1 else optimizer,
    }


def pipeline_bubble_fraction(stages: int, micro_batches: int) -> float:
    """GPipe's idle fraction of a pipeline step: (p-1) / (m+p-1)."""
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"stages and micro_batches must be >= 1, got {stages} and {micro_batches}.")
    return (stages - 1) / (micro_batches + stages - 1)


def _link(cluster: ClusterSpec, group: int, spans_nodes: bool) -> tuple[float, float]:
    if spans_nodes:
        return cluster.inter_bandwidth, cluster.inter_latency
    return cluster.intra_bandwidth, cluster.intra_latency


def ring_time(kind: str, size_bytes: float, group: int, bandwidth: float, latency: float) -> float:
    """Seconds for one ring collective of `size_bytes` (the full buffer) over `group` devices."""
    if group <= 1:
        return 0.0
    steps = 2 * (group - 1) if kind == "all_reduce" else group - 1
    return steps / group * size_bytes / bandwidth + steps * latency


def plan(model: ModelSpec, cluster: ClusterSpec, batch: BatchSpec, layout: Layout) -> StepPlan:
    """Predict one step of `layout` on `cluster` (see the module docstring for every assumption)."""
    model_parallel = layout.tp * layout.pp
    if cluster.num_gpus % model_parallel:
        raise ValueError(f"num_gpus={cluster.num_gpus} is not a multiple of tp x pp = {model_parallel}; "
                         "change the GPU count or the layout.")
    dp = cluster.num_gpus // model_parallel
    if layout.ep > 1 and (model.num_moe_layers == 0 or dp % layout.ep):
        raise ValueError(f"ep={layout.ep} needs a MoE model (num_moe_layers > 0) and a data-parallel degree "
                         f"({dp}) divisible by it.")
    if layout.tp > cluster.gpus_per_node:
        raise ValueError(f"tp={layout.tp} exceeds gpus_per_node={cluster.gpus_per_node}: keep TP inside a node.")
    name = layout.name or _default_name(layout)
    layers_per_stage = math.ceil(model.num_layers / layout.pp)

    # parameters this device's model-parallel slice owns: dense / (tp pp), experts / (tp pp ep)
    dense = model.num_parameters - model.expert_parameters
    slice_params = dense / model_parallel + model.expert_parameters / (model_parallel * layout.ep)
    expert_slice = model.expert_parameters / (model_parallel * layout.ep)
    # ZeRO shards over the data-parallel group: dense over dp, experts over dp / ep (their own replicas)
    states = model_states_bytes(slice_params - expert_slice, dp, layout.zero_stage)
    expert_states = model_states_bytes(expert_slice, max(dp // layout.ep, 1), layout.zero_stage)
    memory = {key: states[key] + expert_states[key] for key in states}
    if layout.zero_stage == 3:  # gathered working set: this layer and the prefetched next one, params + grads
        memory["gathered_layers"] = 2 * (2 + 2) * slice_params / layers_per_stage
    tokens_micro = batch.sequence_length * batch.micro_batch_size
    per_token_layer = (2 * model.hidden_size if batch.recompute else
                       (34 * model.hidden_size + 5 * model.num_attention_heads * batch.sequence_length)
                       / layout.tp)
    in_flight = min(batch.micro_batches, layout.pp) if layout.pp > 1 else 1
    memory["activations"] = per_token_layer * tokens_micro * layers_per_stage * in_flight
    total_memory = sum(memory.values())

    # compute: the replica's tokens through this device's share of the active parameters
    flops_per_token = (8 if batch.recompute else 6) * model.active
    compute = flops_per_token * batch.tokens_per_replica / model_parallel / (cluster.peak_flops * cluster.mfu)
    bubble = pipeline_bubble_fraction(layout.pp, batch.micro_batches)
    compute_with_bubble = compute / (1 - bubble)

    comm_bytes, comm_time = {}, {}
    # data parallel (gradients, and parameters under ZeRO-3): the group spans nodes when dp devices do not fit in
    # one node's share left by tp x pp
    dp_spans = dp * model_parallel > cluster.gpus_per_node
    bw, lat = _link(cluster, dp, dp_spans)
    grad_elements = slice_params - expert_slice
    expert_elements = expert_slice
    factor = 3 if layout.zero_stage == 3 else 2  # elements moved per parameter (ZeRO paper, section 7)
    # how often per step: ZeRO-3 gathers (and ZeRO-2 / ZeRO-3 reduce-scatter) every micro-batch; DDP and ZeRO-1
    # accumulate locally and reduce once per step
    rounds = batch.micro_batches if layout.zero_stage >= 2 else 1
    collectives = rounds * (3 if layout.zero_stage == 3 else 2) * layers_per_stage  # one per layer each
    if dp > 1:
        volume = rounds * factor * 2 * (grad_elements * (dp - 1) / dp
                                        + expert_elements * (max(dp // layout.ep, 1) - 1) / max(dp // layout.ep, 1))
        comm_bytes["data_parallel"] = volume
        comm_time["data_parallel"] = volume / bw + collectives * (dp - 1) * lat
    if layout.tp > 1:
        size = tokens_micro * model.hidden_size * 2
        per_step = 4 * layers_per_stage * batch.micro_batches
        tbw, tlat = _link(cluster, layout.tp, False)
        comm_bytes["tensor_parallel"] = per_step * 2 * (layout.tp - 1) / layout.tp * size
        comm_time["tensor_parallel"] = per_step * ring_time("all_reduce", size, layout.tp, tbw, tlat)
    if layout.pp > 1:
        size = tokens_micro * model.hidden_size * 2 / layout.tp
        pbw, plat = _link(cluster, 2, layout.tp * layout.pp > cluster.gpus_per_node)
        sends = 2 * batch.micro_batches  # forward activation out, backward gradient back, per micro-batch
        comm_bytes["pipeline_parallel"] = sends * size
        comm_time["pipeline_parallel"] = sends * (size / pbw + plat)
    if layout.ep > 1:
        moe_layers_here = math.ceil(model.num_moe_layers / layout.pp)
        size = tokens_micro * model.experts_per_token * model.hidden_size * 2 / layout.tp
        ebw, elat = _link(cluster, layout.ep, layout.ep * model_parallel > cluster.gpus_per_node)
        count = 4 * moe_layers_here * batch.micro_batches
        comm_bytes["expert_parallel"] = count * size * (layout.ep - 1) / layout.ep
        comm_time["expert_parallel"] = count * (size * (layout.ep - 1) / layout.ep / ebw + (layout.ep - 1) * elat)

    critical = sum(v for k, v in comm_time.items() if k != "data_parallel")
    dp_time = comm_time.get("data_parallel", 0.0)
    # first gather and last reduction (one layer's worth each) cannot hide behind compute
    exposed = 2 * dp_time / collectives if dp_time else 0.0
    step_overlap = max(compute_with_bubble, dp_time) + exposed + critical
    step_no_overlap = compute_with_bubble + dp_time + critical
    return StepPlan(
        strategy=name, num_gpus=cluster.num_gpus, data_parallel=dp, memory=memory, memory_total=total_memory,
        fits=total_memory <= cluster.memory_bytes, compute_time=compute, bubble_fraction=bubble,
        comm_bytes=comm_bytes, comm_time=comm_time, step_time_overlap=step_overlap,
        step_time_no_overlap=step_no_overlap, efficiency_overlap=compute / step_overlap,
        efficiency_no_overlap=compute / step_no_overlap,
    )


def _default_name(layout: Layout) -> str:
    parts = [{0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}[layout.zero_stage]]
    parts += [f"{k.upper()}{v}" for k, v in (("tp", layout.tp), ("pp", layout.pp), ("ep", layout.ep)) if v > 1]
    return " x ".join(parts)


def standard_layouts(model: ModelSpec, cluster: ClusterSpec) -> list[Layout]:
    """DDP, ZeRO-1/2/3, FSDP (ZeRO-3 per layer), TP in a node, PP over 4 stages, EP (MoE) and 3D, as fit."""
    layouts = [Layout(zero_stage=0, name="DDP"), Layout(zero_stage=1, name="ZeRO-1"),
               Layout(zero_stage=2, name="ZeRO-2"), Layout(zero_stage=3, name="ZeRO-3"),
               Layout(zero_stage=3, name="FSDP (full shard)")]
    tp = min(cluster.gpus_per_node, 8)
    if tp > 1 and cluster.num_gpus % tp == 0 and model.num_attention_heads % tp == 0:
        layouts.append(Layout(tp=tp, zero_stage=1, name=f"TP{tp} + ZeRO-1"))
    pp = 4
    if cluster.num_gpus % pp == 0 and model.num_layers >= pp:
        layouts.append(Layout(pp=pp, zero_stage=1, name=f"PP{pp} + ZeRO-1"))
        if tp > 1 and cluster.num_gpus % (tp * pp) == 0 and model.num_attention_heads % tp == 0:
            layouts.append(Layout(tp=tp, pp=pp, zero_stage=1, name=f"3D: TP{tp} x PP{pp} x ZeRO-1"))
    if model.num_moe_layers:
        ep = 8
        if (cluster.num_gpus % ep) == 0:
            layouts.append(Layout(ep=ep, zero_stage=1, name=f"EP{ep} + ZeRO-1"))
    return layouts


def compare_strategies(model: ModelSpec, cluster: ClusterSpec, batch: BatchSpec,
                       layouts: list[Layout] | None = None) -> list[StepPlan]:
    """`plan` for each layout (default `standard_layouts`), skipping layouts the GPU count cannot hold."""
    plans = []
    for layout in layouts or standard_layouts(model, cluster):
        try:
            plans.append(plan(model, cluster, batch, layout))
        except ValueError:
            continue
    return plans


def scaling_curve(model: ModelSpec, cluster: ClusterSpec, batch: BatchSpec, layout: Layout,
                  gpu_counts: list[int]) -> list[StepPlan]:
    """The same layout and per-replica batch (weak scaling) at each GPU count."""
    return [plan(model, replace(cluster, num_gpus=n), batch, layout) for n in gpu_counts]


def markdown_table(plans: list[StepPlan]) -> str:
    """One row per strategy: memory, compute, communication, step times and efficiency."""
    header = ("| strategy | GPUs | DP | memory/GPU (GB) | fits | compute (s) | bubble | comm (GB/GPU) | comm (s) | "
              "step, overlap (s) | step, no overlap (s) | efficiency overlap | efficiency no overlap |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        rows.append(
            f"| {p.strategy} | {p.num_gpus} | {p.data_parallel} | {p.memory_total / GB:.2f} | "
            f"{'yes' if p.fits else 'no'} | {p.compute_time:.3f} | {p.bubble_fraction:.3f} | "
            f"{sum(p.comm_bytes.values()) / GB:.2f} | {sum(p.comm_time.values()):.3f} | {p.step_time_overlap:.3f} | "
            f"{p.step_time_no_overlap:.3f} | {p.efficiency_overlap:.1%} | {p.efficiency_no_overlap:.1%} |")
    return "\n".join(rows)


def planning_report(model: ModelSpec, cluster: ClusterSpec, batch: BatchSpec, gpu_counts: list[int],
                    curve_layouts: list[Layout] | None = None) -> dict:
    """Everything `scripts/plan_parallel.py` writes: inputs, one plan per strategy, efficiency curves per GPU count."""
    curve_layouts = curve_layouts or [Layout(zero_stage=1, name="ZeRO-1"), Layout(zero_stage=3, name="ZeRO-3")]
    curves = {}
    for layout in curve_layouts:
        points = []
        for n in gpu_counts:
            try:
                points.append(plan(model, replace(cluster, num_gpus=n), batch, layout).to_dict())
            except ValueError:  # this GPU count cannot hold the layout (e.g. not a multiple of tp x pp)
                continue
        curves[layout.name or _default_name(layout)] = points
    plans = compare_strategies(model, cluster, batch)
    return {"model": asdict(model), "cluster": asdict(cluster), "batch": asdict(batch),
            "strategies": [p.to_dict() for p in plans], "markdown": markdown_table(plans), "curves": curves}


def plot_efficiency(curves: dict[str, list[dict]]) -> bytes:
    """PNG: predicted scaling efficiency against GPU count, with and without overlap, one line pair per layout."""
    from ...evaluation.plots import figure_to_png, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in curves.items():
        gpus = [p["num_gpus"] for p in points]
        line, = ax.plot(gpus, [p["efficiency_overlap"] for p in points], marker="o", label=f"{name}, overlap")
        ax.plot(gpus, [p["efficiency_no_overlap"] for p in points], marker="x", linestyle="--",
                color=line.get_color(), label=f"{name}, no overlap")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("predicted scaling efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure_to_png(fig)


def model_spec_from_config(config) -> ModelSpec:
    """A `ModelSpec` from a lightarch (or any transformers causal-LM) config: the model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from ...evaluation.parameters import parameter_counts
    from ...layers import Experts

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts = parameter_counts(model) if hasattr(config, "experts_per_token_limit") else None
    total = sum(p.numel() for p in model.parameters())
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    return ModelSpec(
        num_parameters=total, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        active_parameters=counts["active_max"] if counts else None,
        expert_parameters=counts["routed_experts"] if counts else 0.0,
        num_moe_layers=len(experts),
        experts_per_token=float(config.experts_per_token_limit) if experts else 0.0,
    )


def zero_paper_figure1() -> dict[str, float]:
    """ZeRO paper Figure 1 (Ψ = 7.5B, N_d = 64, K = 12), GB per device: published 120, 31.4, 16.6, 1.9."""
    psi = 7.5e9
    return {name: sum(model_states_bytes(psi, 64, stage).values()) / GB
            for name, stage in (("baseline", 0), ("P_os", 1), ("P_os+g", 2), ("P_os+g+p", 3))}


ARTICLE_MODEL = ModelSpec(num_parameters=175e9, num_layers=96, hidden_size=12288, num_attention_heads=96)
ARTICLE_CLUSTER = ClusterSpec(num_gpus=1000, gpus_per_node=8, memory_bytes=80 * GB, peak_flops=312e12, mfu=0.44,
                              intra_bandwidth=150 * GB, inter_bandwidth=25 * GB)
ARTICLE_BATCH = BatchSpec(sequence_length=2048, micro_batch_size=2, micro_batches=4, recompute=True)


def article_zero3_point() -> StepPlan:
    """The article's ZeRO-3 point at 1,000 GPUs under the stated assumptions (module docstring)."""
    return plan(ARTICLE_MODEL, ARTICLE_CLUSTER, ARTICLE_BATCH, Layout(zero_stage=3, name="ZeRO-3"))


__all__ = [
    "ARTICLE_BATCH",
    "ARTICLE_CLUSTER",
    "ARTICLE_MODEL",
    "BatchSpec",
    "ClusterSpec",
    "Layout",
    "ModelSpec",
    "StepPlan",
    "article_zero3_point",
    "compare_strategies",
    "markdown_table",
    "model_spec_from_config",
    "model_states_bytes",
    "pipeline_bubble_fraction",
    "plan",
    "planning_report",
    "plot_efficiency",
    "ring_time",
    "scaling_curve",
    "standard_layouts",
    "zero_paper_figure1",
]
