"""The model-task names exist once: fmaudit.tasks' constants, and the ModelTask type schemas use matches them."""

from typing import get_args

from fmaudit.tasks import CAPABILITIES, MODALITY, TASKS, ModelTask


def test_model_task_type_matches_the_constants():
    assert set(get_args(ModelTask)) == set(TASKS)
    assert set(CAPABILITIES) == set(TASKS) == set(MODALITY)
