"""The proxy's configuration: config.yaml parsed into typed, validated settings.

This module owns every default. Scalar defaults are the dataclass fields below; the topic list
and the export rules come from the shipped defaults file (config.yaml, installed with the
package as proxy/defaults.yaml), so they exist once. A test checks that the shipped file and
Config() agree.

The validator is hand-written (about 60 lines) rather than pydantic: it needs no compiled
dependency, and its messages name the file and the dotted key ("config.yaml: 'live.transports[0]'
must be one of ..."), which is what an operator reading an exit-2 message needs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
import re
import types
import typing
from dataclasses import dataclass, field

import yaml

from proxy.records import DEFAULT_MAX_RECORD_BYTES

POLICIES = ("public", "owner", "owner_or_unowned")
TRANSPORTS = ("websocket", "xhr_streaming", "xhr", "eventsource", "jsonp", "htmlfile")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LIVE_ACCESS_MODES = ("open", "token")
# What Kafka accepts as a topic name.
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
# Host names, ports, container and pod names; short enough to tag temporary file names.
INSTANCE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


@dataclass
class ListenConfig:
    address: str = "0.0.0.0"
    port: int = 8001
    trust_forwarded_headers: bool = False
    # None: what the descriptor limit leaves (proxy.listener.connection_cap).
    max_connections: int | None = None
    idle_connection_timeout: float = 30.0
    body_timeout: float = 10.0
    max_body_size: int = 8 * 1024
    backlog: int = 1024
    defer_accept: int = 1


@dataclass
class LiveConfig:
    prefix: str = "/live"
    transports: list[str] = field(default_factory=lambda: ["websocket", "xhr_streaming", "xhr", "eventsource"])
    drop_failed_requests: bool = True
    max_session_queue_bytes: int = 4 * 1024 * 1024
    max_queued_bytes: int = 256 * 1024 * 1024
    slow_client_timeout: float = 5.0
    flush_interval: float = 0.01
    streaming_response_limit: int = 8 * 1024 * 1024
    max_message_bytes: int = 64 * 1024
    heartbeat_interval: float = 25.0
    access: str = "open"
    admin_tokens: list[str] = field(default_factory=list)
    auth_timeout: float = 10.0


@dataclass
class TopicExportConfig:
    policy: str = "owner"
    columns: list[str] | None = None
    drop_columns: list[str] = field(default_factory=list)
    flatten: str | None = None
    parent_fields: dict[str, str] = field(default_factory=dict)


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last one silently, so a setting pasted twice quietly overrode the first."""


def _unique_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> typing.Any:
    loader.flatten_mapping(node)
    seen: set[typing.Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # not hashable: construct_mapping below says so
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


def read_yaml(text: typing.Any) -> typing.Any:
    """yaml.safe_load, refusing duplicate keys (a string or an open file)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)


@functools.cache
def shipped_defaults() -> dict[str, typing.Any]:
    """The defaults file shipped with the package (the repository's config.yaml)."""
    text = importlib.resources.files("proxy").joinpath("defaults.yaml").read_text(encoding="utf-8")
    return read_yaml(text)


def default_topics() -> list[str]:
    """The 13 Price Wars live topics, in the order clients receive their history."""
    return list(shipped_defaults()["topics"])


def default_topic_rules() -> dict[str, TopicExportConfig]:
    """The shipped export rules as typed per-topic settings (a fresh copy each call)."""
    raw = shipped_defaults()["export"]["topics"]
    return {topic: _convert(TopicExportConfig, rules, "<shipped defaults>", f"export.topics.{topic}")
            for topic, rules in raw.items()}


@dataclass
class ExportConfig:
    max_concurrent: int = 2
    retention: float = 3600.0
    max_bytes: int = 1024 ** 3
    sweep_interval: float = 60.0
    topics: dict[str, TopicExportConfig] = field(default_factory=default_topic_rules)


@dataclass
class Config:
    kafka_url: str | None = None
    kafka: dict[str, typing.Any] = field(default_factory=dict)
    topics: list[str] = field(default_factory=default_topics)
    history_size: int = 100
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    topic_refresh_interval: float = 2.0
    listen: ListenConfig = field(default_factory=ListenConfig)
    live: LiveConfig = field(default_factory=LiveConfig)
    data_dir: str = "data"
    # None: "<hostname>:<port>", resolved at start-up (ProxyServer.instance_id).
    instance_id: str | None = None
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    log_level: str = "INFO"
    export: ExportConfig = field(default_factory=ExportConfig)
    # Where the settings came from, for error messages; not a config key.
    source: str = field(default="<defaults>", metadata={"internal": True})


def load_config(path: str, *, required: bool = False) -> Config:
    """Read and validate a YAML config file; a missing optional file gives the shipped defaults."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = read_yaml(handle)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: file not found") from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw if raw is not None else {}, source=path)


def parse_config(raw: typing.Any, source: str = "<config>") -> Config:
    """Validate a decoded YAML document and build the Config, naming any bad key."""
    config = _build(Config, raw, source, "")
    config.source = source
    _check_values(config, source)
    return config


def _build(cls: type, raw: typing.Any, source: str, prefix: str) -> typing.Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {_type_name(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known keys: {known})")
        values[key] = _convert(hints[key], value, source, f"{prefix}{key}")
    return cls(**values)


def _convert(hint: typing.Any, value: typing.Any, source: str, key: str) -> typing.Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X], written either way
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) != 1:
            raise TypeError(f"config field {key}: only X | None unions are supported")
        return _convert(options[0], value, source, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, source, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {_type_name(value)}")
        return [_convert(args[0], item, source, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {_type_name(value)}")
        return {str(k): _convert(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{source}: '{key}' must be {_type_name_of(hint)}, got {_type_name(value)}")
    return value


def _check_values(config: Config, source: str) -> None:
    def fail(key: str, why: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: '{key}' {why}")

    if config.history_size < 0:
        fail("history_size", "must be 0 or more")
    if config.max_record_bytes <= 0:
        fail("max_record_bytes", "must be positive")
    if config.topic_refresh_interval <= 0:
        fail("topic_refresh_interval", "must be positive")
    if not 0 <= config.listen.port <= 65535:
        fail("listen.port", "must be a port number (0-65535)")
    if config.listen.max_connections is not None and config.listen.max_connections < 1:
        fail("listen.max_connections", "must be 1 or more (or null: from the descriptor limit)")
    for key in ("idle_connection_timeout", "body_timeout", "max_body_size", "backlog"):
        if getattr(config.listen, key) <= 0:
            fail(f"listen.{key}", "must be positive")
    if config.listen.defer_accept < 0:
        fail("listen.defer_accept", "must be 0 (off) or more")
    if len(set(config.topics)) != len(config.topics):
        fail("topics", "lists a topic twice")
    for i, topic in enumerate(config.topics):
        if not TOPIC_NAME.fullmatch(topic):
            fail(f"topics[{i}]", f"is not a valid Kafka topic name: {topic!r}")
    if not config.live.prefix.startswith("/") or config.live.prefix.endswith("/"):
        fail("live.prefix", "must start with '/' and not end with '/'")
    for i, name in enumerate(config.live.transports):
        if name not in TRANSPORTS:
            fail(f"live.transports[{i}]", f"must be one of {', '.join(TRANSPORTS)}")
    for key in ("max_session_queue_bytes", "max_queued_bytes", "slow_client_timeout", "streaming_response_limit",
                "max_message_bytes", "auth_timeout"):
        if getattr(config.live, key) <= 0:
            fail(f"live.{key}", "must be positive")
    if config.live.access not in LIVE_ACCESS_MODES:
        fail("live.access", f"must be one of {', '.join(LIVE_ACCESS_MODES)}")
    for i, token in enumerate(config.live.admin_tokens):
        try:
            expanded = expand_env(token)
        except ConfigError as exc:
            fail(f"live.admin_tokens[{i}]", f"uses an unset variable: {exc}")
        if not expanded.strip():
            fail(f"live.admin_tokens[{i}]", "is empty")
    if not 0 <= config.live.flush_interval <= 1:
        fail("live.flush_interval", "must be between 0 and 1 (seconds)")
    if config.live.heartbeat_interval <= 0:
        fail("live.heartbeat_interval", "must be positive")
    if config.instance_id is not None and not INSTANCE_ID.fullmatch(config.instance_id):
        fail("instance_id", "must be 1-64 letters, digits, '.', '_', ':' or '-'")
    if config.log_level.upper() not in LOG_LEVELS:
        fail("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    config.log_level = config.log_level.upper()
    if config.export.max_concurrent < 1:
        fail("export.max_concurrent", "must be 1 or more")
    for key in ("retention", "max_bytes", "sweep_interval"):
        if getattr(config.export, key) <= 0:
            fail(f"export.{key}", "must be positive")
    if not config.export.topics:
        # A configuration without export rules gets the shipped ones, never "export nothing".
        config.export.topics = default_topic_rules()
    for topic, rules in config.export.topics.items():
        if rules.policy not in POLICIES:
            fail(f"export.topics.{topic}.policy", f"must be one of {', '.join(POLICIES)}")
        if rules.parent_fields and not rules.flatten:
            fail(f"export.topics.{topic}.parent_fields", "needs 'flatten'")
    for key, value in config.kafka.items():
        if not isinstance(value, (str, int, float, bool)):
            fail(f"kafka.{key}", "must be a string, number or boolean")


def expand_env(value: str, environ: typing.Mapping[str, str] | None = None) -> str:
    """Replace ${VAR} with the environment variable VAR; a missing variable is an error."""
    env = os.environ if environ is None else environ

    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in env:
            raise ConfigError(f"environment variable {name} is not set (used as ${{{name}}} in the kafka settings)")
        return env[name]

    return _ENV_REFERENCE.sub(substitute, value)


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class KafkaSettings:
    """librdkafka properties with ${VAR} expanded, and the expanded values (secrets, never logged)."""

    properties: dict[str, str]
    secrets: frozenset[str]


def kafka_settings(config: Config) -> KafkaSettings:
    """The Kafka client settings of the config; bootstrap from kafka_url. A missing ${VAR} raises."""
    props: dict[str, str] = {}
    secrets: set[str] = set()
    for key, value in config.kafka.items():
        if isinstance(value, bool):
            props[key] = "true" if value else "false"
            continue
        text = str(value)
        props[key] = expand_env(text)
        secrets.update(expand_env(match.group(0)) for match in _ENV_REFERENCE.finditer(text))
    if config.kafka_url:
        props["bootstrap.servers"] = config.kafka_url
    return KafkaSettings(props, frozenset(secrets))


def admin_tokens(config: Config) -> list[str]:
    """live.admin_tokens with ${VAR} expanded (secrets: never log them)."""
    return [expand_env(token) for token in config.live.admin_tokens]


def kafka_properties(config: Config) -> dict[str, str]:
    """librdkafka properties from the config with ${VAR} expanded; bootstrap from kafka_url."""
    return kafka_settings(config).properties


def _type_name(value: typing.Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _type_name_of(hint: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(hint, str(hint))
