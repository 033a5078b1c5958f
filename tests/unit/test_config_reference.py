"""The README's configuration reference is generated from the settings models: this fails
when a setting was added or changed without regenerating it."""

from __future__ import annotations

from support import config_reference


def test_the_readme_reference_is_up_to_date() -> None:
    block = config_reference.current(config_reference.README.read_text())
    assert block is not None, "README.md lost its configuration reference markers"
    assert block == config_reference.render(), "run: python -m support.config_reference"


def test_every_setting_is_listed_with_what_it_does() -> None:
    text = config_reference.render()
    for _, model in config_reference.MODELS:
        for name in model.model_fields:
            env = config_reference._env_name(model, name)
            (row,) = [line for line in text.splitlines() if line.startswith(f"| `{env}` |")]
            assert not row.endswith("|  |"), f"{env} has no description in its settings model"


def test_secrets_are_not_printed() -> None:
    text = config_reference.render()
    for secret in ("postgres-local", "app-local", "reader-local", "debezium-local"):
        assert secret not in text
