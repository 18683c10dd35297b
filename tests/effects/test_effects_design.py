"""Design matrices from stage-table rows: sparse activations, covariate encoding, modifier resolution."""
import numpy as np
import pandas as pd
import pytest

from tokens2policy.effects.design import (
    build_feature_spec, feature_matrix, modifier_values, neuron_id, neuron_matrix, resolve_modifiers,
)


def test_neuron_matrix_places_values_and_ignores_other_neurons():
    out = neuron_matrix([[1, 5], [], [5, 9], None], [[0.5, 2.0], [], [3.0, 1.0], None], [5, 1])
    np.testing.assert_array_equal(out, [[2.0, 0.5], [0, 0], [3.0, 0], [0, 0]])


def test_feature_matrix_numeric_fill_and_one_hot_levels_from_spec():
    pdf = pd.DataFrame({"age": [1.0, np.nan, 3.0], "region": ["a", "b", "a"],
                        "indices": [[2], [], [2]], "values": [[1.5], [], [0.5]]})
    spec = build_feature_spec(pdf, ["age", "region"], [2])
    assert spec.names() == ["age", "region=a", "region=b", "neuron_2"]
    np.testing.assert_array_equal(feature_matrix(pdf, spec), [[1, 1, 0, 1.5], [2, 0, 1, 0], [3, 1, 0, 0.5]])
    # a task seeing only some rows encodes with the driver's spec (same columns, same fill)
    np.testing.assert_array_equal(feature_matrix(pdf.iloc[[1]], spec), [[2, 0, 1, 0]])
    with pytest.raises(ValueError, match="covariate column"):
        build_feature_spec(pdf, ["missing"], [])


def test_resolve_modifiers_uses_source_column_or_nexis_kind_convention():
    mods = pd.DataFrame({"feature": ["12", "age", "1"], "kind": ["Z", "W", "W"], "label": ["sports", None, None],
                         "round_added": [1, 2, 3]})
    out = resolve_modifiers(mods, ["tenure", "age"])  # no source column: Z = neuron, W = covariate
    assert [(m.feature, m.source, m.neuron, m.column, m.label) for m in out] == [
        ("neuron_12", "neuron", 12, None, "sports"), ("age", "covariate", None, "age", None),
        ("age", "covariate", None, "age", None)]
    with_source = mods.assign(source=["neuron", "covariate", "covariate"])
    assert [m.source for m in resolve_modifiers(with_source, ["tenure", "age"])] == ["neuron", "covariate", "covariate"]
    assert neuron_id("neuron_7") == 7 and neuron_id(3) == 3
    with pytest.raises(ValueError, match="kind"):
        resolve_modifiers(mods.assign(kind="Q"), ["age"])
    pdf = pd.DataFrame({"age": [30.0, 40.0], "indices": [[12], [1]], "values": [[0.7], [2.0]]})
    vals = modifier_values(pdf, out[:2])
    np.testing.assert_array_equal(vals["neuron_12"], [0.7, 0.0])
    np.testing.assert_array_equal(vals["age"], [30.0, 40.0])
