"""Training lightarch models with `transformers.Trainer`: callbacks, checkpoints and atomic output, command-line
helpers, trainers. Training behaviour is registered here, where training is set up, never by building a layer."""

from .callbacks import STATS_FILE, MoeStatsCallback, TimeBudgetCallback
from .checkpoints import atomic_save_pretrained, last_complete_checkpoint, write_atomically
from .cli import available_cpus, other_running_processes, parse_config_overrides, script_parser
from .multimodal_trainer import MultiModalTrainer
from .router_bias import RouterBiasUpdateCallback, register_router_bias_hook

__all__ = [
    "STATS_FILE",
    "MoeStatsCallback",
    "MultiModalTrainer",
    "RouterBiasUpdateCallback",
    "TimeBudgetCallback",
    "atomic_save_pretrained",
    "available_cpus",
    "last_complete_checkpoint",
    "other_running_processes",
    "parse_config_overrides",
    "register_router_bias_hook",
    "script_parser",
    "write_atomically",
]
