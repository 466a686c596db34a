"""The README documents what a user types and sends: every request input, and the two main commands."""

from pathlib import Path

from swiftdiffusion.request import CONTROLNET_MODES, LORA_MODES, SCHEDULER_NAMES
from swiftdiffusion.schema import REQUEST_INPUTS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_request_input_and_choice_is_documented():
    for spec in REQUEST_INPUTS:
        assert f"`{spec.name}`" in README, spec.name
    for choice in (*SCHEDULER_NAMES, *LORA_MODES, *CONTROLNET_MODES):
        assert f"`{choice}`" in README, choice


def test_the_two_commands_are_documented():
    assert "make serve" in README and "make test" in README
