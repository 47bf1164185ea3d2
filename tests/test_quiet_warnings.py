"""The command-line tools drop only the dependency messages a user cannot act on; other warnings still show."""

from __future__ import annotations

import logging
import warnings

import pytest

from adaface._quiet import _LOG_NOISE, _DropMessages, quiet_dependency_noise


@pytest.fixture
def quiet():
    """quiet_dependency_noise() for one test: its logging and warnings filters are removed afterwards."""
    with warnings.catch_warnings():
        quiet_dependency_noise()
        yield
    for name in _LOG_NOISE:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _DropMessages)]:
            logger.removeFilter(f)


def test_only_the_listed_messages_are_dropped(quiet, caplog):
    quiet_dependency_noise()  # idempotent: one filter per logger
    diffusers = logging.getLogger("diffusers.models.modeling_utils")
    assert len([f for f in diffusers.filters if isinstance(f, _DropMessages)]) == 1
    with caplog.at_level(logging.WARNING):
        diffusers.warning("Cannot initialize model with low cpu memory usage because `accelerate` was not found")
        diffusers.warning("There are modules in UNet2DConditionModel that should be kept in float32: []")
        diffusers.warning("There are modules in UNet2DConditionModel that should be kept in float32: ['norm']")
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        logging.getLogger("transformers.utils.import_utils").warning("something else")
    assert [r.getMessage() for r in caplog.records] == [
        "There are modules in UNet2DConditionModel that should be kept in float32: ['norm']", "something else"]


def test_dependency_future_warnings_from_insightface_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_dependency_noise()
        exec(compile("import warnings; warnings.warn('estimate is deprecated', FutureWarning)", "x", "exec"),
             {"__name__": "insightface.utils.face_align"})
        exec(compile("import warnings; warnings.warn('ours', FutureWarning)", "x", "exec"), {"__name__": "adaface.x"})
    assert [str(w.message) for w in caught] == ["ours"]
