"""A key written in another table than its own (the planes' configs differ) says where it lives in this config."""

import pytest

from plait.parallel.config import DataParallelRunConfig
from plait.parallel.pipeline.config import PipelineRunConfig
from plait.ps.config import PSRunConfig
from plait.settings.config import ConfigError, read_config


@pytest.mark.parametrize("cls, text, home", [
    (DataParallelRunConfig, "[data]\nbatch_size = 8\n", "in this config, 'batch_size' is 'train.batch_size'"),
    (PipelineRunConfig, "[train]\nbatch_size = 8\n", "in this config, 'batch_size' is 'data.batch_size'"),
    (PSRunConfig, "[train]\nlr = 0.1\n", "in this config, 'lr' is 'optimizer.lr'"),
])
def test_a_key_in_another_planes_table_is_told_its_home(tmp_path, cls, text, home):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="unknown config key") as err:
        read_config(cls, path, [])
    assert home in str(err.value)


def test_a_key_no_table_has_gets_no_home(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError) as err:
        read_config(PSRunConfig, path, [])
    assert "unknown config key 'train.learning_rate'" in str(err.value) and "in this config" not in str(err.value)
