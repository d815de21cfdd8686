"""Configuration: one TOML file, validated fail-closed into immutable objects."""

from appliance.config.load import (
    DEFAULT_PATH,
    ConfigError,
    check_bind_address,
    config_warnings,
    is_pattern,
    load,
    parse,
    read_api_keys,
)
from appliance.config.model import (
    ALWAYS,
    CPU,
    ON_DEMAND,
    ApplianceConfig,
    EventsConfig,
    LlamaServerConfig,
    MetricsConfig,
    ModelConfig,
    ServerConfig,
    SupervisionConfig,
)

__all__ = [
    "ALWAYS",
    "CPU",
    "DEFAULT_PATH",
    "ON_DEMAND",
    "ApplianceConfig",
    "ConfigError",
    "EventsConfig",
    "LlamaServerConfig",
    "MetricsConfig",
    "ModelConfig",
    "ServerConfig",
    "SupervisionConfig",
    "check_bind_address",
    "config_warnings",
    "is_pattern",
    "load",
    "parse",
    "read_api_keys",
]
