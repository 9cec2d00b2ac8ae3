"""epochs_per_rollout (K) and its old name updates_per_rollout: accepted everywhere a key is, never stored twice."""

import pytest

from dash_fast import DashConfig, GRPOConfig
from dash_fast.config import ConfigError, make_config


def test_old_name_sets_the_field_and_reads_it_back():
    cfg = DashConfig(updates_per_rollout=3)
    assert cfg.epochs_per_rollout == 3 and cfg.updates_per_rollout == 3
    assert "updates_per_rollout" not in cfg.to_dict() and cfg.to_dict()["epochs_per_rollout"] == 3
    assert DashConfig(**cfg.to_dict()).epochs_per_rollout == 3  # a saved config round-trips
    cfg.updates_per_rollout = 2
    assert cfg.epochs_per_rollout == 2


def test_old_name_in_overrides_and_files(tmp_path):
    assert make_config(overrides=["updates_per_rollout=2"]).epochs_per_rollout == 2
    assert make_config(overrides=["epochs_per_rollout=4"]).epochs_per_rollout == 4
    path = tmp_path / "run.yaml"
    path.write_text("updates_per_rollout: 3\n")
    assert make_config(str(path)).epochs_per_rollout == 3
    assert make_config(str(path), overrides=["epochs_per_rollout=5"]).epochs_per_rollout == 5  # later layer wins


@pytest.mark.parametrize("build", [
    lambda: DashConfig(updates_per_rollout=3, epochs_per_rollout=2),
    lambda: make_config(overrides=["updates_per_rollout=3", "epochs_per_rollout=2"]),
])
def test_both_names_with_different_values_is_a_one_line_error(build):
    with pytest.raises(ConfigError, match=r"updates_per_rollout=3 and epochs_per_rollout=2"):
        build()


def test_trl_num_iterations_is_epochs_per_rollout():
    assert GRPOConfig(max_steps=2, num_iterations=3).to_dash_config().epochs_per_rollout == 3
