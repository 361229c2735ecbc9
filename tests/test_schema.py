"""Config schemas (harness/schema.py): every shipped option passes; wrong types, ranges, keys fail in one line."""

from __future__ import annotations

import pytest

from harness.cli import GROUPS, UnknownOptionError, check_overrides, options
from harness.config import compose_config
from harness.schema import SCHEMAS, ConfigError, validate


@pytest.mark.parametrize("group", GROUPS)
def test_every_shipped_option_has_a_schema_and_passes_it(group):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        assert cfg[group]._target_ in SCHEMAS[group], f"conf/{group}/{option}.yaml: add a schema"
        validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["limit=0"], "limit=0 must be >= 1"),
        (["seed=-1"], "seed=-1 must be >= 0"),
        (["strict=maybe"], "strict='maybe' must be true or false"),
        (["method=var", "method.rho=2"], "method.rho=2 must be >= 0 and <= 1"),
        (["method=var", "method.tau=0"], "method.tau=0 must be > 0"),
        (["method=var", "method.layers=[1,-2]"], "method.layers=[1, -2] item 1 (-2) must be >= 0"),
        (["method=var", "method.layers=all"], "method.layers='all' must be 'auto' or a list of ints >= 0"),
        (["method=fastv", "method.ratio=1.0"], "method.ratio=1.0 must be >= 0 and < 1"),
        (["method=fastv", "method.rule=mena"], "method.rule='mena' must be 'last' or 'mean'; did you mean 'mean'?"),
        (["method=embedlens", "method.drop=[dead,sinks]"], "item 1 ('sinks') must be 'vit_sink' or 'llm_sink'"),
        (["method=iri", "method.components=[]"], "method.components=[] must not be empty"),
        # an empty layer or sink-dimension list would make the method a silent `none`
        (["method=var", "method.layers=[]"], "method.layers=[] must not be empty"),
        (["method=var", "method.sink_dims=[]"], "method.sink_dims=[] must not be empty"),
        (["method=carve", "method.layers=[]"], "method.layers=[] must not be empty"),
        (["method=vhr", "method.layers=[]"], "method.layers=[] must not be empty"),
        (["method=carve", "method.k=0"], "method.k=0 must be >= 1"),
        (["method=none", "+method.alpha=1"], "method.alpha is not an option of method 'none'"),
        (["method=var", "+method.rhoo=1"], "did you mean 'rho'?"),
        (["model=qwen_vl", "model.variant=qwen3"], "model.variant='qwen3' must be 'auto'"),
        (["task=vcrbench", "task.fps=0"], "task.fps=0 must be > 0"),
        (["task=pope", "task.splits=[]"], "task.splits=[] must not be empty"),
        (["task=pope", "task.n_boot=-5"], "task.n_boot=-5 must be >= 0"),
        (["logger=wandb", "logger.init_timeout=0"], "logger.init_timeout=0 must be > 0"),
        (["method=var", "~method.rho"], "method.rho is missing"),
    ],
)
def test_wrong_values_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_target_asks_for_a_schema():
    with pytest.raises(ConfigError, match=r"method: no schema for _target_ 'methods\.mine\.Mine'; add one"):
        validate(compose_config(["method._target_=methods.mine.Mine"]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["method=vra"], "unknown method 'vra'; did you mean 'var'?"),
        (["-m", "model=llava,qwen_v"], "unknown model 'qwen_v'; did you mean 'qwen_vl'"),
        (["logger=wandbb"], "unknown logger 'wandbb'; did you mean 'wandb'?"),
        (["batchsize=2"], "unknown option 'batchsize'; did you mean 'batch_size'"),
        (["task=mme", "task.questions=x"], "task.questions is not an option of task 'mme'"),
        (["task.gen_kwargs.max_tokens=3"], "task.gen_kwargs.max_tokens is not an option of task 'pope'"),
    ],
)
def test_command_line_precheck(args, message):
    with pytest.raises(UnknownOptionError) as info:
        check_overrides(args)
    assert message in str(info.value)


def test_command_line_precheck_lets_valid_lines_through():
    for args in (
        [],
        ["-m", "method=none,var", "method.p=0.3", "seed=0,1"],
        ["+task.gen_kwargs.min_new_tokens=4", "hydra/launcher=submitit_local", "hydra.run.dir=x"],
        ["task=chair", "task.gen_kwargs.max_new_tokens=8", "model=qwen_vl", "model.vllm.max_model_len=4096"],
    ):
        check_overrides(args)
