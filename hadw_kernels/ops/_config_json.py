"""A `LossConfig` as a custom-op argument: torch.library schemas have no dataclass type, so the Triton ops take the
config as a JSON string, built here and parsed back (cached) on the other side."""

from __future__ import annotations

import dataclasses
import functools
import json

from hadw_kernels.config import LossConfig

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(LossConfig))


@functools.lru_cache(maxsize=64)
def config_from_json(config_json: str) -> LossConfig:
    return LossConfig(**json.loads(config_json))


def config_to_json(config: LossConfig) -> str:
    """Built with plain string operations, which dynamo folds to a constant even for a config created inside the
    traced function (an `assume_constant_result` version silently saw the default config there)."""
    parts = []
    for name in _CONFIG_FIELDS:
        value = getattr(config, name)
        if value is None:
            text = "null"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value + '"'
        else:
            text = repr(value)
        parts.append('"' + name + '": ' + text)
    return "{" + ", ".join(parts) + "}"
