"""What a benchmark ran on: versions, platform and CPUs, recorded with every result."""

from __future__ import annotations

import os
import platform

import torch
import transformers

from ...training.cli import available_cpus


def machine_info(num_threads: int) -> dict:
    """torch / transformers / Python versions, the platform and processor, the CPUs visible and available to this
    process, and the torch threads the measurements used."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "available_cpus": available_cpus(),
        "torch_num_threads": num_threads,
    }
