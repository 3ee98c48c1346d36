import pytest
import yaml

from gradwise.config import Config, load_config, parse_override
from gradwise.errors import ConfigError


def test_defaults_have_the_keys_later_issues_rely_on():
    cfg = Config()
    for section in ("seed", "data", "model", "optim", "schedule", "train", "precision", "memory", "log"):
        assert section in cfg.to_dict()
    assert cfg.data.name == "mnist1d" and cfg.model.name == "cnn"
    assert cfg.train.steps == 3000 and cfg.train.epochs is None
    assert cfg.precision == "fp32"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\noptim:\n  name: sgd\n  lr: 0.5\ntrain:\n  batch_size: 32\n")
    cfg = load_config(path, ["optim.lr=0.1", "train.epochs=2", "train.steps=null", "model.channels=[4,4]",
                             "model.kernel_sizes=[3,3]", "log.progress=off"])
    assert cfg.seed == 3 and cfg.optim.name == "sgd" and cfg.optim.lr == 0.1
    assert cfg.train.batch_size == 32 and cfg.train.epochs == 2 and cfg.train.steps is None
    assert cfg.model.channels == [4, 4]
    assert cfg.log.progress == "off"  # YAML 1.1 would have read `off` as False


def test_scientific_notation_and_round_trip():
    cfg = load_config(None, ["optim.lr=1e-3"])
    assert cfg.optim.lr == pytest.approx(1e-3)
    again = load_config(None, [])
    assert Config.model_validate(yaml.safe_load(again.to_yaml())) == again


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["optim.lrr=1"], ["unknown key 'optim.lrr'", "allowed:", "lr"]),
        (["bogus=1"], ["unknown key 'bogus'", "optim"]),
        (["optim.lr=abc"], ["optim.lr='abc'", "valid number"]),
        (["optim.lr=-1"], ["optim.lr=-1", "greater than 0"]),
        (["optim.name=rmsprop"], ["optim.name='rmsprop'", "'sgd'", "'adamw'"]),
        (["train.steps=10", "train.epochs=2"], ["train.steps=10", "train.epochs=2", "only one"]),
        (["model.channels=[8,8]"], ["model.channels", "model.kernel_sizes"]),
        (["model.d_model=10", "model.n_head=4"], ["d_model=10", "n_head=4"]),
        (["precision=fp8"], ["precision='fp8'", "'fp32'", "'bf16'"]),
        (["optim.lr.x=1"], ["optim.lr={'x': 1}", "valid number"]),
        (["seed=1", "seed.x=2"], ["'seed' is a value"]),
        (["optim.lr"], ["must look like key.sub=value"]),
    ],
)
def test_bad_config_names_key_value_and_what_is_allowed(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_bad_yaml_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_parse_override_reads_values_as_yaml():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=no") == (["a"], "no")
