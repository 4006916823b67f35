import pytest

from lora_ogpsa import OGPSAConfig


def test_defaults_are_valid_and_round_trip():
    config = OGPSAConfig()
    assert config.project == "update"
    assert OGPSAConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_directions", 0, r"`max_directions` must be an integer >= 1, got 0"),
    ("max_directions", 2.0, "max_directions"),
    ("max_directions", True, "max_directions"),
    ("energy", 0.0, r"`energy` must be in \(0, 1\]"),
    ("energy", 1.01, "energy"),
    ("energy", "0.9", "energy"),
    ("refresh_every", -1, "refresh_every"),
    ("reference_examples", 0, "reference_examples"),
    ("project", "both", r"`project` must be one of update, grad, none, got 'both'"),
    ("reference_batch_size", 0, "reference_batch_size"),
    ("opening_tokens", -2, "opening_tokens"),
    ("later_token_weight", 1.5, r"`later_token_weight` must be in \[0, 1\]"),
    ("later_token_weight", float("nan"), "later_token_weight"),
    ("protect", "weights", r"`protect` must be one of gradients, activations, both, got 'weights'"),
    ("activation_energy", 0.0, r"`activation_energy` must be in \(0, 1\]"),
    ("activation_positions", "first", r"`activation_positions` must be all or opening"),
    ("activation_opening_tokens", 0, "activation_opening_tokens"),
])
def test_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        OGPSAConfig(**{field: value})


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown OGPSA setting\(s\) \['max_direction'\]"):
        OGPSAConfig.from_dict({"max_direction": 4})


def test_one_sided_needs_update_mode():
    assert OGPSAConfig(one_sided=True).one_sided
    with pytest.raises(ValueError, match="`one_sided` needs project='update'"):
        OGPSAConfig(one_sided=True, project="grad")
    with pytest.raises(ValueError, match="`one_sided` must be true or false"):
        OGPSAConfig(one_sided="yes")
