"""Command-line helpers shared by the scripts: HfArgumentParser with one-line errors, config overrides, CPU probing."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from transformers import HfArgumentParser


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def other_running_processes() -> int:
    """Runnable tasks on the machine right now, besides this one (Linux `/proc/loadavg`; 0 elsewhere).

    Scripts give torch `available_cpus() - other_running_processes()` threads: on a busy machine, threads that wait
    for each other at every op make small ops hundreds of times slower.
    """
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def parse_config_overrides(text: str) -> dict:
    """`--config_overrides` of the scripts: '{"a": 1}' or 'a=1,b=true,c=[1,0]' -> dict.

    Values are JSON when they parse, strings otherwise; commas inside brackets belong to the value (a JSON list stays
    whole). Raises ValueError for an item without '='.
    """
    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        return value
    items, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    overrides = {}
    for item in filter(None, (part.strip() for part in [*items, current])):
        if "=" not in item:
            raise ValueError(f"{item!r} is not key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


class ScriptArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line naming the option (not the usage of 130 TrainingArguments)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help` for every option)\n")


def script_parser(
    dataclass_types: Sequence[type],
    description: str,
    training_defaults: dict,
    help_overrides: dict[str, str] | None = None,
) -> ScriptArgumentParser:
    """The parser of a training script: its dataclasses, TrainingArguments defaults it changes (listed in the epilog
    of `--help`), and clearer help for options whose meaning the script narrows (e.g. `output_dir`)."""
    parser = ScriptArgumentParser(
        tuple(dataclass_types),
        description=description,
        epilog="TrainingArguments defaults changed by this script: "
        + ", ".join(f"{k}={v}" for k, v in training_defaults.items()),
    )
    parser.set_defaults(**training_defaults)
    for action in parser._actions:
        if action.dest in (help_overrides or {}):
            action.help = help_overrides[action.dest]
    return parser


def known_config_fields(config_class: type) -> set[str]:
    """The field names a config accepts: its own `__init__` arguments and every `PretrainedConfig` attribute."""
    import inspect

    from transformers import PretrainedConfig

    own = {name for name, parameter in inspect.signature(config_class.__init__).parameters.items()
           if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY) and name != "self"}
    return own | set(PretrainedConfig().to_dict())


def config_from_preset(config_class: type, preset: str, config_overrides: str | None = None):
    """`--preset NAME --config_overrides TEXT` -> a config: the preset (the only place architecture defaults live)
    with the overrides on top. Bad input is a ValueError naming the option and the fix."""
    presets = getattr(config_class, "presets", None)
    names = sorted(presets()) if callable(presets) else None
    try:
        overrides = parse_config_overrides(config_overrides) if config_overrides else {}
    except ValueError as error:
        raise ValueError(f"--config_overrides {config_overrides!r}: {error}; write key=value,key=value or a JSON "
                         "object.") from None
    if names is not None and preset not in names:
        raise ValueError(f"--preset {preset!r} is not a {config_class.__name__} preset; choose one of {names}.")
    unknown = sorted(set(overrides) - known_config_fields(config_class))
    if unknown:
        raise ValueError(f"--config_overrides: {config_class.__name__} has no field {', '.join(map(repr, unknown))}; "
                         f"see `help({config_class.__name__})` for its fields.")
    from huggingface_hub.errors import StrictDataclassError

    try:
        return config_class.from_preset(preset, **overrides)
    except (TypeError, ValueError, StrictDataclassError) as error:
        raise ValueError(f"--preset {preset} with --config_overrides {config_overrides!r}: {error}") from None
