"""One aggregation registry: the wire declares the names, aggregation/ implements each exactly once,
config offers exactly those choices."""

from __future__ import annotations

from fednode import config as config_module
from fednode.aggregation import AGGREGATION_METHODS as REEXPORTED
from fednode.aggregation.api import RULES
from fednode.wire.messages import AGGREGATION_METHODS


def test_every_wire_name_has_one_rule_and_no_rule_lacks_a_name() -> None:
    assert len(set(AGGREGATION_METHODS)) == len(AGGREGATION_METHODS)
    assert set(RULES) == set(AGGREGATION_METHODS)


def test_names_are_defined_once() -> None:
    assert REEXPORTED is AGGREGATION_METHODS
    choices = {key: values for key, values in config_module.config_choices().items() if key.endswith(".aggregation")}
    assert choices and all(values is AGGREGATION_METHODS for values in choices.values())
