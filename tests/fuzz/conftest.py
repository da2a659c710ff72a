"""The fuzz tier runs against the same real `bentoml serve` as the serving tier."""

from tests.serving.conftest import served  # noqa: F401 - the fixture, shared
