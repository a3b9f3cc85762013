"""Run configs: the pure schema (`schema`), YAML and overrides (`load`), one-line errors (`errors`).

Only the schema is imported here, so model and tokenizer modules can import their base config
classes without pulling in the registries that `load` needs.
"""

from lmzoo.config.schema import (
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    NonNegInt,
    PositiveInt,
    Probability,
    RunConfig,
    SampleConfig,
    Section,
    TokenizerConfig,
    TrainConfig,
    resolve_data_path,
)

__all__ = [
    "DataConfig",
    "FinetuneConfig",
    "ModelConfig",
    "NonNegInt",
    "PositiveInt",
    "Probability",
    "RunConfig",
    "SampleConfig",
    "Section",
    "TokenizerConfig",
    "TrainConfig",
    "resolve_data_path",
]
