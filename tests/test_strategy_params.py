"""Strategy hyperparameters have one source (each strategy's ``Params`` dataclass) and one validator,
whichever way a strategy is built: ``get_strategy``, the CLI's ``-p`` or direct construction. Also the
two helpers the strategies share: the replay bookkeeping and the loss-direction switch."""

from __future__ import annotations

import inspect
import typing
from dataclasses import FrozenInstanceError, fields, is_dataclass

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cmcl.cli import cli
from cmcl.errors import ConfigError
from cmcl.extract.synthetic import SyntheticConfig, write_synthetic
from cmcl.train import objective
from cmcl.train.config import Harness
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import STRATEGIES, get_strategy, resolve_params, strategy_parameters
from cmcl.train.strategies import buffer as replay
from cmcl.train.strategies.base import Objective
from cmcl.train.strategies.co2l import asymmetric_contrastive, space_contrastive_rows
from cmcl.train.strategies.dns import DNS
from cmcl.train.strategies.ewc import fisher_closed_form
from cmcl.train.strategies.gem import grouped_info_nce
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo
from tests.helpers import random_pairs

NAMES = sorted(STRATEGIES)
RULES = {"ge", "gt", "le", "lt", "choices"}
REPLAY = {"der", "derpp", "gem", "co2l", "cflat", "cila"}
HARNESS = Harness(lr=1e-2, weight_decay=1e-2, decay_bias=False, linear_decay=True, clip_norm=1.0)


def _kind(cls, name):
    return next(k for k in typing.get_args(typing.get_type_hints(cls)[name]) or (typing.get_type_hints(cls)[name],)
                if k is not type(None))


def _bad_values():
    """(strategy, field, value outside the declared constraint, a value on its inclusive edge or None)."""
    cases = []
    for name in NAMES:
        cls = STRATEGIES[name].Params
        for f in fields(cls):
            rule, kind = f.metadata, _kind(cls, f.name)
            step = 1 if kind is int else 0.5
            if "choices" in rule:
                cases.append((name, f.name, "nope", None))
            for key, bad, edge in (("ge", -step, 0), ("gt", 0, None), ("le", step, 0), ("lt", 0, None)):
                if key in rule:
                    cases.append((name, f.name, kind(rule[key] + bad), None if edge is None else kind(rule[key])))
    return cases


BAD = _bad_values()


@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_declared_in_the_params_dataclass_only(name):
    cls = STRATEGIES[name]
    assert is_dataclass(cls.Params) and cls.Params.__dataclass_params__.frozen
    declared = {f.name: f.default for f in fields(cls.Params)}
    assert strategy_parameters(name) == declared
    assert set(cls.backbone_defaults.get("languagebind", {})) | set(cls.backbone_defaults.get("synthetic", {})) \
        <= set(declared)
    for f in fields(cls.Params):
        assert set(f.metadata) <= RULES, (f.name, f.metadata)          # a misspelt rule would be ignored
        assert _kind(cls.Params, f.name) in (bool, int, float, str), f.name
        if "choices" in f.metadata:
            assert f.default in f.metadata["choices"]
    # no constructor takes or checks a hyperparameter by hand
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is not None and klass.__module__.startswith("cmcl.train.strategies"):
            params = list(inspect.signature(init).parameters.values())[1:]
            assert [p.kind for p in params] in ([], [inspect.Parameter.VAR_KEYWORD]), klass
            assert "raise" not in inspect.getsource(init), klass
    strategy = cls()
    assert strategy.params == cls.Params()
    assert all(getattr(strategy, k) == v for k, v in declared.items())
    with pytest.raises(FrozenInstanceError):
        setattr(strategy.params, next(iter(declared), "x"), None)


def test_every_range_and_choice_is_tested():
    constrained = {(n, f.name) for n in NAMES for f in fields(STRATEGIES[n].Params) if f.metadata}
    assert {(n, k) for n, k, _, _ in BAD} == constrained
    assert len(constrained) >= 50


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("params")
    write_synthetic(root / "f", SyntheticConfig(dim=64, scale=0.02), datasets=["esc50"])
    (root / "p.toml").write_text('[[step]]\ndataset = "esc50"\nmodalities = ["text", "audio"]\n')
    return root


@pytest.mark.parametrize("name, key, bad, edge", BAD, ids=[f"{n}-{k}" for n, k, _, _ in BAD])
def test_a_value_outside_the_declared_range_is_one_config_error(features, name, key, bad, edge):
    with pytest.raises(ConfigError) as through_registry:
        get_strategy(name, **{key: bad})
    message = str(through_registry.value)
    assert message.startswith(f"strategy {name!r}: {key} must be ") and message.endswith(f"got {bad!r}")
    assert "\n" not in message
    with pytest.raises(ConfigError) as direct:
        STRATEGIES[name](**{key: bad})
    assert str(direct.value) == message
    if edge is not None:             # an inclusive bound is accepted
        assert getattr(STRATEGIES[name](**{key: edge}), key) == edge
    runs = features / "runs" / f"{name}-{key}"
    r = CliRunner().invoke(cli, ["train", "--features", str(features / "f"), "--backbone", "synthetic", "--protocol",
                                 str(features / "p.toml"), "--runs", str(runs), "--epochs", "1", "-q",
                                 "--strategy", name, "-p", f"{key}={bad}"], catch_exceptions=False)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert [ln for ln in r.output.splitlines() if ln.strip()] == [f"cmcl: error: {message}"]
    assert not runs.exists()


def test_types_are_coerced_the_same_way_everywhere():
    assert DNS(lambda_min=1).lambda_min == 1.0 and isinstance(DNS(lambda_min=1).lambda_min, float)
    assert resolve_params("dns", {"lambda_min": 1}) == {**strategy_parameters("dns"), "lambda_min": 1.0}
    assert DNS(energy_in=None).energy_in is None                   # float | None
    for build in (lambda **kw: DNS(**kw), lambda **kw: get_strategy("dns", **kw)):
        with pytest.raises(ConfigError, match="strategy 'dns': parameter project_bias expects true or false"):
            build(project_bias=1)
        with pytest.raises(ConfigError, match="parameter lambda_min expects a number, got True"):
            build(lambda_min=True)                                  # a bool is not a number
        with pytest.raises(ConfigError, match="parameter lambda_min cannot be none"):
            build(lambda_min=None)
        with pytest.raises(ConfigError, match=r"'dns' has no parameter lambda_mni; accepted: lambda_min=0\.01"):
            build(lambda_mni=0.1)
    with pytest.raises(ConfigError, match="parameter buffer_size expects an integer, got 2.0"):
        STRATEGIES["gem"](buffer_size=2.0)
    assert resolve_params("derpp", {}, "languagebind")["beta"] == 0.1   # backbone defaults, validated too


@pytest.mark.parametrize("name", NAMES)
def test_replay_bookkeeping_lives_in_one_class(name):
    cls = STRATEGIES[name]
    assert issubclass(cls, replay.Replay) == (name in REPLAY)
    if name not in REPLAY:
        return
    source = inspect.getsource(inspect.getmodule(cls))
    assert not any(call in source for call in ("ReplayBuffer(", "fill_balanced(", "add_reservoir("))
    learners = ModalityLearners(["text", "audio"], 8)
    strategy = get_strategy(name, buffer_size=8)
    strategy.setup(learners, Objective())
    data = random_pairs(20, 8, 0, ("text", "audio"), 1)
    fit_step(learners, strategy, StepInfo(1, "A", ("text", "audio"), 3), data, harness=HARNESS, epochs=1,
             batch_size=16)
    assert len(strategy.buffer) == 8 and strategy.buffer.offers == (20 if cls.reservoir else 0)
    report = strategy.report()
    assert report[cls.step_key.format(name=name, s=1)] == 8.0
    assert ("buffer/size" in report) == cls.report_totals and ("buffer/offers" in report) == cls.reservoir
    fresh = get_strategy(name, buffer_size=8)
    fresh.setup(learners, Objective())
    fresh.load_state_dict(strategy.state_dict())
    assert torch.equal(fresh.buffer.features().xa, strategy.buffer.features().xa)
    assert {k: v for k, v in fresh.report().items() if "buffer/" in k} == {k: v for k, v in report.items()
                                                                           if "buffer/" in k}


def test_one_loss_direction_switch():
    calls = []
    assert objective.two_way("a2b", lambda: 1.0, lambda: calls.append(1)) == 1.0 and not calls   # lazy
    assert objective.two_way("symmetric", lambda: 1.0, lambda: 3.0) == 2.0
    assert objective.two_way("symmetric", lambda: 1.0, lambda: 3.0, lambda a, b: a + b) == 4.0
    u, v = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).split(3)
    ma = mb = np.array(["text"] * 3)
    users = [lambda d: objective.info_nce(u, v, direction=d),
             lambda d: grouped_info_nce(u, v, torch.tensor([0, 0, 1]), 2, direction=d),
             lambda d: asymmetric_contrastive(u, v, torch.ones(3, dtype=torch.bool), direction=d),
             lambda d: space_contrastive_rows(u, v, ma, mb, torch.ones(3, dtype=torch.bool), direction=d),
             lambda d: fisher_closed_form(u[None], v[None], u[None], v[None], direction=d)]
    for use in users:
        use("a2b"), use("symmetric")
        with pytest.raises(ValueError, match="unknown loss direction 'b2a'"):
            use("b2a")
