"""ModelSpec.validate: every problem reported at once, each naming the field, what was seen and expected."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fastlstm import InvalidModelError, ModelFormatError
from fastlstm.activations import Activation
from fastlstm.spec import DenseLayer, ModelSpec
from random_models import random_spec


@pytest.fixture
def spec():
    return random_spec(np.random.default_rng(0), input_size=3, hidden_size=4, num_layers=2, head=[(2, "identity")])


def replace_cell(spec, layer, **changes):
    layers = list(spec.layers)
    cell = dataclasses.replace(layers[layer].cells[0], **changes)
    layers[layer] = dataclasses.replace(layers[layer], cells=(cell,))
    return dataclasses.replace(spec, layers=tuple(layers))


def test_valid_spec_passes(spec):
    assert spec.validate() is spec
    assert spec.output_size == 2 and spec.num_state_rows == 2 and spec.state_sizes() == (4, 4)


def test_all_problems_reported_together(spec):
    bad = replace_cell(spec, 0, w_ih=np.zeros((16, 5)), bias=np.zeros(15))
    bad = replace_cell(bad, 1, w_hh=np.zeros((16, 4), dtype=np.int64))
    with pytest.raises(InvalidModelError) as info:
        bad.validate()
    problems = info.value.problems
    assert "layers[0].cells[0].w_ih: expected shape (16, 3), got (16, 5)" in problems
    assert "layers[0].cells[0].bias: expected shape (16,), got (15,)" in problems
    assert "layers[1].cells[0].w_hh: expected a floating-point array, got dtype int64" in problems
    assert len(problems) == 3
    assert isinstance(info.value, ModelFormatError) and isinstance(info.value, ValueError)


def test_layer_option_problems(spec):
    layer = dataclasses.replace(spec.layers[0], direction="sideways", clip=-1.0,
                                gate_activation=Activation.of("softmax"), proj_size=9)
    with pytest.raises(InvalidModelError) as info:
        dataclasses.replace(spec, layers=(layer,) + spec.layers[1:]).validate()
    text = str(info.value)
    assert "layers[0].direction: got 'sideways'" in text
    assert "layers[0].clip: expected a finite number > 0" in text
    assert "layers[0].gate_activation: expected an elementwise Activation" in text
    assert "layers[0].proj_size: expected less than hidden_size=4, got 9" in text


def test_non_finite_weights_and_chain_sizes(spec):
    w = spec.layers[0].cells[0].w_hh.copy()
    w[0, 0] = np.nan
    bad = replace_cell(spec, 0, w_hh=w)
    bad = dataclasses.replace(bad, head=(DenseLayer(np.zeros((2, 5))),), output="every")
    with pytest.raises(InvalidModelError) as info:
        bad.validate()
    text = str(info.value)
    assert "layers[0].cells[0].w_hh: contains NaN or infinite values" in text
    assert "head[0].weight: expected shape (?, 4), got (2, 5)" in text
    assert "output: got 'every'" in text


def test_missing_projection_and_stray_projection(spec):
    rng = np.random.default_rng(1)
    projected = random_spec(rng, input_size=3, hidden_size=6, proj_size=2)
    with pytest.raises(InvalidModelError, match=r"w_hr: missing; proj_size=2 needs a \(2, 6\) projection"):
        replace_cell(projected, 0, w_hr=None).validate()
    with pytest.raises(InvalidModelError, match="w_hr: present but proj_size is 0"):
        replace_cell(spec, 0, w_hr=np.zeros((2, 4))).validate()


def test_empty_model_and_softmax_placement(spec):
    with pytest.raises(InvalidModelError, match="at least one recurrent layer"):
        ModelSpec(layers=()).validate()
    head = (DenseLayer(np.zeros((3, 4)), activation=Activation.of("softmax")), DenseLayer(np.zeros((2, 3))))
    with pytest.raises(InvalidModelError, match="softmax is supported on the last dense layer only"):
        dataclasses.replace(spec, head=head).validate()


def test_activation_parameters_have_documented_defaults():
    assert Activation.of("hard_sigmoid") == Activation("hard_sigmoid", 0.2, 0.5)
    assert Activation.of("leaky_relu").alpha == 0.01
    assert str(Activation.of("scaled_tanh", 2, 3)) == "scaled_tanh(alpha=2.0, beta=3.0)"
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        Activation.of("swish")
