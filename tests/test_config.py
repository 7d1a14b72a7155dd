"""Settings precedence and refusals: defaults < TOML < environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_settings
from agent.errors import ConfigError


def test_toml_then_environment_then_overrides(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('cache_dir = "/srv/shoal"\nconcurrency = 12\n'
                   '[oss]\nendpoint = "http://127.0.0.1:9"\nbucket = "lab"\nprefix = "mirror"\n'
                   '[modelscope]\nendpoint = "http://127.0.0.1:8"\nenabled = false\n')
    env = {"SHOAL_CONFIG": str(cfg)}
    s = load_settings(env=env)
    assert (s.cache_dir, s.concurrency, s.oss_bucket, s.oss_prefix, s.use_modelscope) == (
        Path("/srv/shoal"), 12, "lab", "mirror", False)
    s = load_settings(env={**env, "SHOAL_CONCURRENCY": "3", "SHOAL_USE_MODELSCOPE": "yes"})
    assert (s.concurrency, s.use_modelscope) == (3, True)
    assert load_settings(env={**env, "SHOAL_CONCURRENCY": "3"}, concurrency=5).concurrency == 5


def test_secrets_never_show_in_repr(tmp_path):
    s = load_settings(env={"SHOAL_CONFIG": str(tmp_path / "none.toml"), "OSS_ACCESS_KEY_ID": "id-123",
                           "OSS_ACCESS_KEY_SECRET": "very-secret", "OSS_SESSION_TOKEN": "sts-token",
                           "MODELSCOPE_API_TOKEN": "ms-token"})
    text = repr(s)
    assert "very-secret" not in text and "sts-token" not in text and "ms-token" not in text


@pytest.mark.parametrize("env,message", [
    ({"SHOAL_CONCURRENCY": "0"}, "outside 1..64"),
    ({"SHOAL_CONCURRENCY": "many"}, "$SHOAL_CONCURRENCY"),
    ({"SHOAL_OSS_BUCKET": "lab"}, "OSS_ENDPOINT"),
    ({"OSS_ACCESS_KEY_ID": "id"}, "only one of OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET"),
    ({"OSS_SESSION_TOKEN": "t"}, "OSS_SESSION_TOKEN is set without"),
    ({"SHOAL_CHUNK_SIZE": "1000"}, "power of two"),
    ({"SHOAL_USE_MODELSCOPE": "perhaps"}, "not a valid bool"),
    ({"SHOAL_OSS_BUCKET": "Lab_Models", "OSS_ENDPOINT": "http://127.0.0.1:9"}, "is not an OSS bucket name"),
    ({"SHOAL_OSS_CREDENTIALS": "ecs"}, 'use "auto"'),
    ({"SHOAL_OSS_CREDENTIALS": "chain", "OSS_ACCESS_KEY_ID": "i", "OSS_ACCESS_KEY_SECRET": "s"}, "keep one"),
    ({"SHOAL_OSS_RESTORE_TIER": "Fast"}, "Expedited, Standard or Bulk"),
])
def test_bad_settings_are_refused_naming_the_setting(tmp_path, env, message):
    with pytest.raises(ConfigError) as info:
        load_settings(env={"SHOAL_CONFIG": str(tmp_path / "none.toml"), **env})
    assert message in str(info.value)


def test_a_broken_config_file_is_named(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("concurrency = [")
    with pytest.raises(ConfigError, match=str(cfg)):
        load_settings(env={"SHOAL_CONFIG": str(cfg)})
