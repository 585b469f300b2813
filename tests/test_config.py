"""Config: defaults, validation listing every problem, env overrides, the example file."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon.config import (SECTIONS, Config, ConfigError, build_config, field_docs, load_config,
                           render_yaml)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_frozen():
    cfg = load_config(environ={})
    assert cfg == Config()
    assert cfg.model.base_model == "embedded:SmolLM2-135M-Instruct"
    assert cfg.paths.state_dir == "./lorad-state"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lora_r = 8  # type: ignore[misc]


def test_every_field_has_a_doc_and_a_default():
    rows = field_docs()
    assert len(rows) > 50
    for section, key, default, doc in rows:
        assert len(doc.strip()) >= 10, (section, key, doc)
        assert default is not None, (section, key)


def test_three_mistakes_are_all_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lora_r: 0\n  lr: 0.1\ndrift:\n  alpha: high\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    problems = err.value.problems
    assert len(problems) == 3
    text = str(err.value)
    assert "train.lora_r" in text and ">= 1" in text
    assert "train.lr: unknown key" in text and "learning_rate" in text
    assert "drift.alpha: must be a number" in text


@pytest.mark.parametrize("data, needle", [
    ({"nope": {}}, "nope: unknown section"),
    ({"model": {"dtype": "float8"}}, "model.dtype: must be one of auto, float32, bfloat16, float16"),
    ({"model": {"quantization": 4}}, "model.quantization: must be a string"),
    ({"serve": {"port": 70000}}, "serve.port: must be >= 1 and <= 65535"),
    ({"serve": {"port": "80"}}, "serve.port: must be an integer"),
    ({"train": {"gradient_checkpointing": "yes"}}, "train.gradient_checkpointing: must be true/false"),
    ({"data": {"strip_patterns": ["(unclosed"]}}, "data.strip_patterns: invalid regular expression"),
    ({"data": {"strip_patterns": "x"}}, "data.strip_patterns: must be a list of strings"),
    ({"data": {"holdout_fraction": 0.0}}, "data.holdout_fraction: must be > 0.0 and < 0.5"),
    ({"schedule": {"monthly_refresh_cron": "0 3 1 *"}}, "cron expression needs 5 fields"),
    ({"schedule": {"monthly_refresh_cron": "0 25 1 * *"}}, "cron hour value 25 out of range 0-23"),
    ({"schedule": {"timezone": "Mars/Olympus"}}, "unknown time zone"),
    ({"train": {"lora_targets": "q_proj, v-proj"}}, "train.lora_targets: must be 'all-linear'"),
    ({"data": {"max_seq_len": 16, "max_prompt_tokens": 100, "max_response_tokens": 100}}, "data.max_seq_len (16)"),
    ({"train": 3}, "train: must be a mapping"),
])
def test_each_check_names_key_and_allowed_values(data, needle):
    with pytest.raises(ConfigError) as err:
        build_config(data)
    assert needle in str(err.value)


def test_ints_accepted_for_floats_and_values_applied():
    cfg = build_config({"drift": {"alpha": 0.01}, "train": {"epochs": 2, "lora_targets": "q_proj,v_proj"}})
    assert cfg.drift.alpha == 0.01
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.train.lora_targets == "q_proj,v_proj"


def test_env_overrides_beat_the_file_and_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lora_r: 4\n")
    cfg = load_config(path, environ={"LORAD_TRAIN__LORA_R": "8", "LORAD_SERVE__ADMIN_TOKEN": "s3cret",
                                     "LORAD_DATA__STRIP_PATTERNS": "['#+', '@']", "OTHER": "x"})
    assert cfg.train.lora_r == 8
    assert cfg.serve.admin_token == "s3cret"
    assert cfg.data.strip_patterns == ["#+", "@"]
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"LORAD_TRAIN__LORA_R": "zero", "LORAD_BOGUS__X": "1"})
    assert "train.lora_r: must be an integer" in str(err.value)
    assert "LORAD_BOGUS__X: unknown section" in str(err.value)


def test_overrides_beat_env():
    cfg = load_config(None, environ={"LORAD_PATHS__STATE_DIR": "/env"}, overrides={"paths": {"state_dir": "/cli"}})
    assert cfg.paths.state_dir == "/cli"


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad, environ={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar, environ={})
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty, environ={}) == Config()


def test_secrets_are_masked_when_shown():
    cfg = build_config({"serve": {"admin_token": "hunter2"}})
    assert "hunter2" not in render_yaml(cfg)
    assert cfg.to_dict()["serve"]["admin_token"] == "***"
    assert cfg.to_dict(mask_secrets=False)["serve"]["admin_token"] == "hunter2"


def test_example_file_matches_the_dataclasses():
    example = ROOT / "deploy" / "config.example.yaml"
    assert example.read_text() == render_yaml(Config()) + "\n", \
        "regenerate with: lorad config show --defaults > deploy/config.example.yaml"
    loaded = yaml.safe_load(example.read_text())
    assert set(loaded) == set(SECTIONS)
    assert build_config(loaded) == Config()


def test_rendered_config_round_trips():
    cfg = build_config({"train": {"lora_r": 8}, "data": {"strip_patterns": ["[★☆]"]}})
    again = build_config(yaml.safe_load(render_yaml(cfg, with_docs=False, mask_secrets=False)))
    assert again == cfg


def test_config_module_imports_no_heavy_libraries():
    code = "import daemon.config, daemon.cli, sys; bad = {'torch','transformers','yaml','numpy'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_docs_config_reference_matches_the_dataclasses():
    from daemon.config import render_markdown

    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    section = doc[doc.index(start) + len(start):doc.index(end)]
    assert section.strip() == render_markdown().strip(), \
        "regenerate docs/configuration.md's reference with: make docs"


def test_job_logs_carry_no_bitsandbytes_hub_kernel_warning():
    # bitsandbytes warns at import on AVX512-BF16 CPUs that it could not fetch a hub kernel; lorad's jobs import
    # the pipelines package first, which quiets that logger (elsewhere the warning never appears).
    code = "import pipelines.train, peft"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert "gemm_4bit_forward" not in out.stderr


def test_fleet_keys_are_checked():
    from daemon.config import ConfigError, build_config, fleet_token

    cfg = build_config({"fleet": {"replicas": ["http://10.0.0.7:8000", "https://r2.internal"],
                                  "adapter_url": "http://10.0.0.5:8000"}, "serve": {"admin_token": "t" * 20}})
    assert fleet_token(cfg) == "t" * 20 and cfg.fleet.replicas[1] == "https://r2.internal"
    with pytest.raises(ConfigError) as e:
        build_config({"fleet": {"replicas": ["http://a:8000", "http://a:8000/", "ftp://b", "http://u:p@c"],
                                "control_plane": "10.0.0.5:8000", "local_adapter_roots": ["adapters"],
                                "reconcile_seconds": 0, "token": 5}})
    text = str(e.value)
    for key in ("fleet.replicas", "fleet.control_plane", "fleet.local_adapter_roots", "fleet.reconcile_seconds",
                "fleet.token: must be a string, got a value of type int (hidden: it is a secret)"):
        assert key in text, key
    with pytest.raises(ConfigError, match="fleet.replicas needs a token"):
        build_config({"fleet": {"replicas": ["http://a:8000"]}})
    assert build_config({"fleet": {"token": "secret-fleet-token"}}).to_dict()["fleet"]["token"] == "***"
