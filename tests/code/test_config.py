from pathlib import Path

import pytest
from pydantic import ValidationError

from maskwatch.config import ConfigError, Settings, load_settings, parse_dotted_overrides


def test_defaults_are_the_recipe():
    s = Settings()
    assert (s.train.phase1_epochs, s.train.phase1_learning_rate) == (20, 1e-3)
    assert (s.train.phase2_epochs, s.train.phase2_learning_rate) == (10, 1e-5)
    assert s.train.fine_tune_last_layers == 30
    assert s.train.single_phase_epochs == 30
    assert (s.data.image_size, s.train.dense_units, s.train.dropout) == (160, 512, 0.5)


def test_precedence_yaml_env_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  phase1_epochs: 5\n  batch_size: 8\ndata:\n  crop_margin: 0.3\n")
    s = load_settings(cfg, "quick", {"train": {"batch_size": 4}}, environ={"MASKWATCH_DATA_DIR": "/data/x"})
    assert s.train.phase1_epochs == 5          # file beats preset
    assert s.train.phase2_epochs == 1          # preset beats default
    assert s.train.batch_size == 4             # CLI beats file
    assert s.data.source_dir == Path("/data/x")  # environment
    assert s.data.crop_margin == 0.3


def test_dotted_overrides_parse_yaml_scalars():
    assert parse_dotted_overrides(["train.phase1_epochs=3", "data.max_photos=", "train.imbalance=none"]) == {
        "train": {"phase1_epochs": 3, "imbalance": "none"}, "data": {"max_photos": None}}


@pytest.mark.parametrize(("overrides", "message"), [
    (["oops"], "section.key=value"), (["train=2"], "section.key=value"), (["=3"], "section.key=value"),
    (["train..x=1"], "section.key=value"), (["train.phase1_epochs=["], "not valid YAML.*quote it"),
    (["train.x=1", "train.x.y=2"], "'train.x.y=2' conflicts with the override that sets train.x itself")])
def test_malformed_overrides_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_dotted_overrides(overrides)


def test_unknown_keys_and_bad_values_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.phase1_epoch: no such setting \(did you mean "
                                          r"train\.phase1_epochs or train\.phase2_epochs\?\)"):
        load_settings(None, "full", {"train": {"phase1_epoch": 3}}, environ={})
    with pytest.raises(ConfigError, match=r"trian: no such setting \(did you mean train or "):
        load_settings(None, "full", {"trian": {"phase1_epochs": 3}}, environ={})
    with pytest.raises(ConfigError, match=r"realtime\.zzz: no such setting \(known: smoothing, "):
        load_settings(None, "full", {"realtime": {"zzz": 1}}, environ={})
    with pytest.raises(ConfigError, match=r"train\.imbalance: .* \(got 'smote'\)"):
        load_settings(None, "full", {"train": {"imbalance": "smote"}}, environ={})
    for key in ("two words", "cl\u00e9"):  # an HTTP header value the client can send as typed
        with pytest.raises(ConfigError, match="serve.api_key"):
            load_settings(None, "full", environ={"MASKWATCH_API_KEY": key})
    with pytest.raises(ConfigError, match="unknown preset"):
        load_settings(None, "fast", environ={})
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml", environ={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [\n")
    with pytest.raises(ConfigError, match=f"config file {broken} is not valid YAML: .*line 2"):
        load_settings(broken, environ={})
    broken.write_text("- train\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_settings(broken, environ={})


def test_default_tracking_store_is_sqlite_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Settings().tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert Settings().to_flat_dict()["train.phase1_epochs"] == 20


def test_detector_sizes_must_suit_the_backbone():
    """The detector's network halves its input five times: its sizes are multiples of 32."""
    from maskwatch.config import DetectorTrainConfig

    assert DetectorTrainConfig(input_side=800, train_canvas=384).input_side == 800
    for field in ("input_side", "train_canvas"):
        with pytest.raises(ValidationError, match="multiple of 32"):  # the section alone: pydantic's own error
            DetectorTrainConfig(**{field: 600})
