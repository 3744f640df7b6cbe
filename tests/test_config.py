"""Typed configs: YAML in and out, unknown keys and wrong types rejected with every problem named."""

import pytest

from kdedge.config import DistillConfig, TrainConfig, config_from_dict, config_to_yaml, load_config
from kdedge.errors import ConfigError


def test_yaml_roundtrip(tmp_path):
    cfg = DistillConfig(epochs=3, alpha=0.25, temperature=2.0, student="dw_cnn@0.5", train_limit=100)
    (tmp_path / "c.yaml").write_text(config_to_yaml(cfg))
    assert load_config(DistillConfig, tmp_path / "c.yaml") == cfg


def test_overrides_win_over_file(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\nalpha: 0.1\n")
    cfg = load_config(DistillConfig, tmp_path / "c.yaml", {"epochs": 2})
    assert cfg.epochs == 2 and cfg.alpha == 0.1


def test_dashes_and_int_for_float(tmp_path):
    (tmp_path / "c.yaml").write_text("batch-size: 32\nlr: 1\n")
    cfg = load_config(TrainConfig, tmp_path / "c.yaml")
    assert cfg.batch_size == 32 and cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_unknown_keys_listed_with_valid_ones(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 2\nalpah: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) alpah; valid keys: .*alpha"):
        load_config(DistillConfig, tmp_path / "c.yaml")


def test_train_config_rejects_distill_keys():
    with pytest.raises(ConfigError, match="unknown key.*temperature"):
        config_from_dict(TrainConfig, {"temperature": 2.0})


def test_all_type_errors_gathered():
    with pytest.raises(ConfigError) as err:
        config_from_dict(DistillConfig, {"epochs": "ten", "lr": "fast", "augment": "yes"})
    message = str(err.value)
    assert "epochs must be an integer, got 'ten'" in message
    assert "lr must be a number" in message and "augment must be true/false" in message


def test_bool_is_not_an_integer():
    with pytest.raises(ConfigError, match="epochs must be an integer, got True"):
        config_from_dict(TrainConfig, {"epochs": True})


def test_all_value_errors_gathered():
    with pytest.raises(ConfigError) as err:
        DistillConfig(alpha=1.5, temperature=0, cache="cloud", batch_size=0)
    message = str(err.value)
    for part in ("alpha must be in [0, 1]", "temperature must be > 0", "cache must be one of", "batch_size must be >= 1"):
        assert part in message


@pytest.mark.parametrize(
    "text, message",
    [("epochs: [1\n", "not valid YAML at line"), ("- 1\n- 2\n", "expected a mapping"), ("3\n", "expected a mapping")],
)
def test_malformed_yaml(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, tmp_path / "c.yaml")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")


def test_empty_file_is_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("")
    assert load_config(TrainConfig, tmp_path / "c.yaml") == TrainConfig()
