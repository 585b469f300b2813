"""From a YAML file, the environment and overrides to a checked ``Config``: every problem found, raised at once."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Mapping

from daemon.config.checks import ConfigError
from daemon.config.sections import SECRET_FIELDS, SECTIONS, Config

ENV_PREFIX = "LORAD_"


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            list: "a list of strings"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> tuple[Any, str | None]:
    """Check ``value`` against the field type; ints are accepted where floats are expected."""
    if tp is bool:
        return (value, None) if isinstance(value, bool) else (value, f"must be {_type_name(tp)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return value, f"must be {_type_name(tp)}"
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        return value, f"must be {_type_name(tp)}"
    if tp is str:
        return (value, None) if isinstance(value, str) else (value, f"must be {_type_name(tp)}")
    if tp is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value), None
        return value, f"must be {_type_name(tp)}"
    raise TypeError(f"unsupported config field type {tp!r}")  # a bug in this module, not user input


def _check_field(key: str, f: dataclasses.Field, value: Any, tp: Any) -> tuple[Any, list[str]]:
    value, err = _coerce(value, tp)
    secret = tuple(key.split(".", 1)) in SECRET_FIELDS
    if err:  # a secret's value never reaches a message: config errors end up in logs and CI output
        shown = f"a value of type {type(value).__name__} (hidden: it is a secret)" if secret else repr(value)
        return value, [f"{key}: {err}, got {shown}"]
    m = f.metadata
    problems = []
    if m.get("choices") and value not in m["choices"]:
        problems.append(f"{key}: must be one of {', '.join(map(str, m['choices']))}; got {value!r}")
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    failed = [f"{sym} {m[k]}" for k, sym, ok in bounds if m.get(k) is not None and not ok(value, m[k])]
    if failed:
        allowed = " and ".join(f"{sym} {m[k]}" for k, sym, _ in bounds if m.get(k) is not None)
        problems.append(f"{key}: must be {allowed}; got {value!r}")
    if m.get("check") and not problems:
        msg = m["check"](value)
        if msg:
            problems.append(f"{key}: {msg}")
    return value, problems


def _cross_checks(cfg: Config) -> list[str]:
    """Rules that involve more than one field."""
    problems = []
    d = cfg.data
    if cfg.ingest.max_cell_bytes > cfg.ingest.max_batch_bytes:
        problems.append(f"ingest.max_cell_bytes ({cfg.ingest.max_cell_bytes}) must be at most ingest.max_batch_bytes "
                        f"({cfg.ingest.max_batch_bytes}): one cell must fit in a batch")
    if d.max_seq_len < min(d.max_prompt_tokens, d.max_response_tokens):
        problems.append(f"data.max_seq_len ({d.max_seq_len}) must be at least min(data.max_prompt_tokens, "
                        f"data.max_response_tokens) = {min(d.max_prompt_tokens, d.max_response_tokens)}")
    t = cfg.train
    if t.nnodes > 1 and t.distributed == "none":
        problems.append(f"train.nnodes is {t.nnodes} but train.distributed is 'none'; set train.distributed to "
                        f"ddp or fsdp, or train.nnodes to 1")
    if t.nnodes > 1 and not t.rdzv_endpoint:
        problems.append(f"train.nnodes is {t.nnodes} but train.rdzv_endpoint is empty; set it to HOST:PORT of this "
                        f"node as the other nodes reach it (e.g. 'node0.example:29400')")
    if cfg.train.distributed == "fsdp" and cfg.model.quantization == "8bit":
        problems.append("train.distributed 'fsdp' cannot shard 8-bit weights; use model.quantization '4bit' "
                        "(FSDP-QLoRA) or 'none', or train.distributed 'ddp'")
    if cfg.fleet.replicas and not (cfg.fleet.token or cfg.serve.admin_token):
        problems.append("fleet.replicas needs a token the replicas accept: set fleet.token or serve.admin_token")
    return problems


def _parse_env_value(raw: str, tp: Any = None) -> Any:
    """Environment values are YAML scalars/lists: '8' -> 8, 'true' -> True, '[a, b]' -> ['a', 'b'].

    A string field keeps the raw text (a numeric token stays a string), and a list field also takes
    comma-separated text ('key1,key2'), so keys need no YAML quoting.
    """
    import yaml

    if tp is str:
        return raw
    if tp is list and not raw.lstrip().startswith("["):
        return [part.strip() for part in raw.split(",") if part.strip()]
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def env_overrides(environ: Mapping[str, str]) -> tuple[dict, list[str]]:
    """Collect ``LORAD_SECTION__FIELD=value`` variables into a nested dict (plus problems)."""
    out: dict[str, dict] = {}
    problems = []
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        if section not in SECTIONS:
            problems.append(f"environment {name}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
            continue
        out.setdefault(section, {})[key] = _parse_env_value(raw, typing.get_type_hints(SECTIONS[section]).get(key))
    return out, problems


def build_config(data: Mapping[str, Any] | None, source: str = "config") -> Config:
    """Turn a nested mapping into a validated ``Config``; raise ``ConfigError`` listing every problem."""
    problems: list[str] = []
    data = data or {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"top level must be a mapping of sections, got {type(data).__name__}"], source)
    for section in data:
        if section not in SECTIONS:
            problems.append(f"{section}: unknown section; allowed: {', '.join(SECTIONS)}")
    sections = {}
    for section, cls in SECTIONS.items():
        given = data.get(section) or {}
        if not isinstance(given, Mapping):
            problems.append(f"{section}: must be a mapping of keys, got {type(given).__name__}")
            given = {}
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in given:
            if key not in fields:
                close = [k for k in fields if k.startswith(str(key)[:4])]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                problems.append(f"{section}.{key}: unknown key{hint}; allowed: {', '.join(fields)}")
        kwargs = {}
        for name, f in fields.items():
            if name in given:
                value, errs = _check_field(f"{section}.{name}", f, given[name], hints[name])
                problems.extend(errs)
                if not errs:
                    kwargs[name] = value
        sections[section] = cls(**kwargs)
    cfg = Config(**sections)
    if not problems:
        problems.extend(_cross_checks(cfg))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _merge(base: dict, over: Mapping) -> dict:
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, values in over.items():
        if isinstance(values, Mapping) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def _yaml_problem(e: Exception) -> str:
    """A YAML error without the quoted line PyYAML adds: that line may hold a token or an API key."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def load_config(path: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Load defaults < YAML file < LORAD_* environment < explicit overrides, validating everything.

    Raises:
        ConfigError: listing every problem (unreadable file, bad YAML, unknown keys, types, ranges).
    """
    source = str(path) if path else "config"
    data: dict = {}
    problems: list[str] = []
    if path is not None:
        import yaml

        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([f"file not found: {p} (create one from deploy/config.example.yaml)"], source)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError([f"cannot read {p}: {e}"], source)
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError([f"invalid YAML: {_yaml_problem(e)}"], source)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"top level must be a mapping of sections, got {type(loaded).__name__}"], source)
        data = loaded or {}
    env, env_problems = env_overrides(os.environ if environ is None else environ)
    problems.extend(env_problems)
    merged = _merge(data, env)
    if overrides:
        merged = _merge(merged, {k: v for k, v in overrides.items() if v})
    try:
        cfg = build_config(merged, source)
    except ConfigError as e:
        raise ConfigError(problems + e.problems, source)
    if problems:
        raise ConfigError(problems, source)
    return cfg
