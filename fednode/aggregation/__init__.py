"""Pure tensor math over adapter deltas: decoding and validation, FedAvg, exact LoRA aggregation,
robust rules. No I/O besides bytes in and out."""

from fednode.aggregation.api import AGGREGATION_METHODS, AggregateResult, AggregationOptions, aggregate
from fednode.aggregation.delta import (
    DEFAULT_MAX_DELTA_BYTES,
    DEFAULT_MAX_UPDATE_NORM,
    AdapterLayout,
    LayoutEntry,
    dump_delta,
    load_delta,
    validate_update,
)
from fednode.aggregation.exact import LoraAggregate, exact, split_lora_keys, stacked
from fednode.aggregation.fedavg import fedavg
from fednode.aggregation.robust import DEFAULT_TRIM_BETA, clipped_fedavg, coordinate_median, trimmed_mean

__all__ = [
    "AGGREGATION_METHODS",
    "DEFAULT_MAX_DELTA_BYTES",
    "DEFAULT_MAX_UPDATE_NORM",
    "DEFAULT_TRIM_BETA",
    "AdapterLayout",
    "AggregateResult",
    "AggregationOptions",
    "LayoutEntry",
    "LoraAggregate",
    "aggregate",
    "clipped_fedavg",
    "coordinate_median",
    "dump_delta",
    "exact",
    "fedavg",
    "load_delta",
    "split_lora_keys",
    "stacked",
    "trimmed_mean",
    "validate_update",
]
