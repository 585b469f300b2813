"""One YAML config file, one frozen dataclass per stage, validated before anything starts.

Every field has a default, a type, a one-line doc (``metadata["doc"]``, which is also the
configuration reference in docs/ and the comment in ``deploy/config.example.yaml``) and a check.
``load_config`` collects EVERY problem (unknown key, wrong type, value out of range) and
raises one ``ConfigError`` listing them all, each naming the key and what is allowed.

Precedence, lowest to highest: defaults < YAML file < ``LORAD_<SECTION>__<FIELD>``
environment variables < command-line overrides (e.g. ``--state``).
Only the stdlib (and PyYAML, lazily) is imported here: ``lorad --help`` must stay instant, and the
package imports nothing else from lorad (every stage reads its settings from it).

The rooms, arrows pointing down:
  checks.py    ``ConfigError``, the field helper ``_f`` and the checks a field can carry (cron, time zone,
               URLs, endpoints, maps...), and the parsers of the values that need one
  sections.py  one frozen dataclass per stage (``PathsConfig`` ... ``MetricsConfig``), ``Config`` holding
               them, ``SECTIONS``, ``SECRET_FIELDS`` and ``fleet_token``
  load.py      YAML + environment + overrides -> a checked ``Config`` (``load_config``, ``build_config``,
               ``env_overrides``): per-field type and range checks, then the checks across sections
  render.py    the commented example YAML (``lorad config show --defaults``) and the Markdown reference
"""

from __future__ import annotations

from daemon.config.checks import (
                                  PRIMARY_METRICS,
                                  SCORE_KINDS,
                                  ConfigError,
                                  parse_category_map,
                                  parse_category_weights,
                                  parse_endpoint,
)
from daemon.config.load import ENV_PREFIX, build_config, env_overrides, load_config
from daemon.config.render import field_docs, render_markdown, render_yaml
from daemon.config.sections import (
                                  SECRET_FIELDS,
                                  SECTIONS,
                                  Config,
                                  DataConfig,
                                  DriftConfig,
                                  EvalConfig,
                                  FleetConfig,
                                  IngestConfig,
                                  MetricsConfig,
                                  ModelConfig,
                                  PathsConfig,
                                  PromoteConfig,
                                  ScheduleConfig,
                                  ServeConfig,
                                  TrainConfig,
                                  fleet_token,
)

__all__ = ["ENV_PREFIX", "PRIMARY_METRICS", "SCORE_KINDS", "SECRET_FIELDS", "SECTIONS", "Config", "ConfigError",
           "DataConfig", "DriftConfig", "EvalConfig", "FleetConfig", "IngestConfig", "MetricsConfig", "ModelConfig",
           "PathsConfig", "PromoteConfig", "ScheduleConfig", "ServeConfig", "TrainConfig", "build_config",
           "env_overrides", "field_docs", "fleet_token", "load_config", "parse_category_map",
           "parse_category_weights", "parse_endpoint", "render_markdown", "render_yaml"]
