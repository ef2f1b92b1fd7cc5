"""Typed run configuration: schema, YAML loading with overrides, validation, DeepSpeed JSON derivation."""

from facescale.config.errors import ConfigError
from facescale.config.load import config_to_dict, dump_config, load_config
from facescale.config.schema import Config

__all__ = ["Config", "ConfigError", "config_to_dict", "dump_config", "load_config"]
