import pytest

from parallel.config import PRESETS, Config, ConfigError, build_config
from parallel.spec_files import load_config


def test_defaults_are_valid_single_process() -> None:
    cfg = load_config(None, world_size=1)
    assert cfg.model.dim == PRESETS["tiny"]["dim"] and cfg.parallel.world_size == 1


def test_overrides_parse_yaml_values_and_explicit_dims_beat_preset() -> None:
    cfg = load_config(None, ["model.preset=debug", "model.n_layers=2", "train.lr=1e-3", "parallel.dp=2"], world_size=2)
    assert cfg.model.dim == PRESETS["debug"]["dim"] and cfg.model.n_layers == 2
    assert cfg.train.lr == 1e-3 and cfg.parallel.dp == 2


def test_grad_accum_and_dp_shard() -> None:
    cfg = build_config(
        {"parallel": {"dp": 4, "dp_replicate": 2, "zero": 3}, "train": {"global_batch": 16, "micro_batch": 2}}
    )
    assert cfg.grad_accum == 2 and cfg.parallel.dp_shard == 2


def test_explicit_model_without_preset_requires_all_dims() -> None:
    with pytest.raises(ConfigError, match="no preset given, so these are required: .*ffn_dim"):
        build_config(
            {"model": {"preset": None, "dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 10}}
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"n_heads": 6}}, "dim=64 is not divisible by n_heads=6"),
        ({"model": {"n_kv_heads": 3}}, "n_heads=8 is not divisible by n_kv_heads=3"),
        ({"parallel": {"dp_replicate": 2, "dp": 2}}, "needs parallel.zero in 1-3"),
        ({"parallel": {"tp": 0}}, "parallel.tp: Input should be greater than or equal to 1 (got 0)"),
        ({"parallel": {"pp": 2, "microbatches": 3}}, "parallel.microbatches=3 must equal"),
        ({"parallel": {"pp": 2, "pp_virtual": 2}}, "pp_schedule=1f1b runs one stage per rank"),
        ({"train": {"steps": "many"}}, "train.steps: Input should be a valid integer"),
        ({"data": {"source": "tokens"}}, "data.path is required for data.source=tokens"),
    ],
)
def test_invalid_configs_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.steps"])


def test_every_field_has_a_description() -> None:
    def walk(model: type) -> None:
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, Config.__mro__[1]):
                walk(field.annotation)
            elif name not in ("model", "parallel", "train", "data", "metrics"):
                assert field.description, f"{model.__name__}.{name} has no docstring"

    walk(Config)


def test_zbv_takes_its_only_pp_virtual_when_unset() -> None:
    cfg = build_config({"parallel": {"pp": 2, "pp_schedule": "zbv"}}, world_size=2)
    assert cfg.parallel.pp_virtual == 2 and "pp_virtual" not in cfg.parallel.model_fields_set
    assert build_config({"parallel": {"pp_schedule": "zbv"}}).parallel.pp_virtual == 1  # pp=1: no pipeline
    assert build_config(cfg.model_dump(by_alias=True)).parallel.pp_virtual == 2  # a dump reads back the same
    # filled in again when what it depends on changes (validate_assignment), unlike a value the user set
    cfg.parallel.pp_schedule = "1f1b"
    assert cfg.parallel.pp_virtual == 1


@pytest.mark.parametrize("virtual", [1, 3])
def test_zbv_refuses_an_explicit_wrong_pp_virtual(virtual: int) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"parallel": {"pp": 2, "pp_schedule": "zbv", "pp_virtual": virtual}})
    assert str(err.value) == (
        f"parallel.pp_virtual={virtual}: pp_schedule=zbv runs exactly 2 stages per rank; set pp_virtual=2"
    )


def test_pp_virtual_over_2_takes_the_one_schedule_that_runs_it() -> None:
    data = {"model": {"preset": "debug"}, "parallel": {"pp": 2, "pp_virtual": 3}}
    assert build_config(data).parallel.pp_schedule == "interleaved_1f1b"
    # pp_virtual=2 fits interleaved_1f1b and zbv: no single answer, so it is refused and both are named
    with pytest.raises(ConfigError, match="use pp_virtual=1, or pp_schedule=interleaved_1f1b or zbv"):
        build_config({"parallel": {"pp": 2, "pp_virtual": 2}})
    with pytest.raises(ConfigError, match="pp_schedule=1f1b runs one stage per rank"):  # set, so kept
        build_config({**data, "parallel": {**data["parallel"], "pp_schedule": "1f1b"}})


def test_unset_dp_fills_the_world() -> None:
    cfg = load_config(None, ["parallel.tp=2"], world_size=4)
    assert cfg.parallel.dp == 2 and cfg.parallel.world_size == 4
    with pytest.raises(ConfigError, match=r"dp\*tp\*pp\*cp = 1\*2\*1\*1 = 2 but the world size is 4"):
        load_config(None, ["parallel.tp=2", "parallel.dp=1"], world_size=4)  # set: checked, not replaced
    with pytest.raises(ConfigError, match="but the world size is 3"):
        load_config(None, ["parallel.tp=2"], world_size=3)  # no dp fills it
    assert load_config(None, ["parallel.tp=2"]).parallel.dp == 1  # no world size known (a spec on its own)


def test_compile_is_a_bool_and_takes_every_layout() -> None:
    assert build_config({"train": {"compile": True}}).train.compile is True
    assert build_config({"train": {"compile": True}, "parallel": {"tp": 2}}, world_size=2).train.compile is True
    with pytest.raises(ConfigError, match="train.compile"):
        build_config({"train": {"compile": "sometimes"}})
