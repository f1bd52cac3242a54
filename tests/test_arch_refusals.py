"""Configurations an adapter refuses, by name, because they have no exact per-source decomposition."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

import circuits
from circuits.errors import CircuitsError
from circuits.testing import CONFIGS


def test_post_layer_norm_opt_is_refused_naming_the_config_field():
    config = CONFIGS["opt"]()
    config.do_layer_norm_before = False  # OPT-350m: LayerNorms after each sublayer, over the whole stream
    hf = AutoModelForCausalLM.from_config(config)
    with pytest.raises(CircuitsError, match="do_layer_norm_before") as error:
        circuits.Model.from_hf(hf)
    assert "'opt'" in str(error.value)


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("falcon", "parallel_attn", False),  # new decoder architecture, sequential: no ln_attn/ln_mlp built
        ("falcon_multi_query", "num_ln_in_parallel_attn", 2),  # old architecture: input_layernorm not built
        ("falcon_sequential_alibi", "num_kv_heads", 2),  # old multi-head: k/v repeated into a shape error
    ],
)
def test_falcon_variants_transformers_cannot_run_are_refused_naming_the_field(name, field, value):
    config = CONFIGS[name]()
    setattr(config, field, value)
    hf = AutoModelForCausalLM.from_config(config)
    with pytest.raises(CircuitsError, match=field) as error:
        circuits.Model.from_hf(hf)
    assert "'falcon'" in str(error.value)


def test_bloom_residual_after_layer_norm_is_refused_naming_the_field():
    config = CONFIGS["bloom"]()
    config.apply_residual_connection_post_layernorm = True  # the residual is the normed stream
    hf = AutoModelForCausalLM.from_config(config)
    with pytest.raises(CircuitsError, match="apply_residual_connection_post_layernorm") as error:
        circuits.Model.from_hf(hf)
    assert "'bloom'" in str(error.value)


def test_olmo2_with_an_attention_output_bias_is_refused_naming_the_field():
    config = CONFIGS["olmo2"]()
    config.attention_bias = True  # the bias passes through the norm after attention: its share belongs to no head
    hf = AutoModelForCausalLM.from_config(config)
    with pytest.raises(CircuitsError, match="attention_bias") as error:
        circuits.Model.from_hf(hf)
    assert "'olmo2'" in str(error.value)
