"""The recipe in plain sight: each fine-tuning bundle's docs table agrees with the task table and the configs."""

from __future__ import annotations

import json

import pytest
from helpers import REPO

from bundles.recipe_table import BUNDLES, CONFIG_VALUES, main, recipe_table, render
from custom.segmentation.task import RECIPE_VALUES, TASKS

#: top-level ids that take the task table's value but are not the user's to change: they follow the data
FROM_THE_DATA = {"in_channels", "num_classes"}


def train_json(bundle: str) -> dict:
    return json.loads((REPO / bundle / "configs" / "train.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_docs_carry_the_generated_recipe_table(bundle):
    readme = (REPO / bundle / "docs" / "README.md").read_text(encoding="utf-8")
    assert render(readme, recipe_table(REPO / bundle)) == readme, "stale: run python -m bundles recipe_table"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_recipe_value_is_a_top_level_id_that_reaches_the_task(bundle):
    train = train_json(bundle)
    task_ids = [r.config_id for r in RECIPE_VALUES]
    config_ids = [c[0] for c in CONFIG_VALUES]
    assert [i for i in task_ids + config_ids if i not in train] == []
    # each task value goes into `task`, the one object the pipeline reads (augmentation values in its sub-dict)
    passed = {k: v for k, v in train["task"].items() if k not in ("_target_", "task", "augmentation")}
    passed |= train["task"]["augmentation"]
    assert passed == {i: f"@{i}" for i in task_ids}
    # and every top-level id the task table sets is in the table (a new task value cannot go undocumented)
    from_table = {k for k, v in train.items() if isinstance(v, str) and "@task_table" in v}
    assert from_table - FROM_THE_DATA == set(task_ids)


def test_the_table_cites_a_source_for_every_btcv_value():
    missing = [r.config_id for r in RECIPE_VALUES if not TASKS["BTCV"].sources.get(r.config_id)]
    assert missing == []
    assert all(source for _, _, source, _ in CONFIG_VALUES)


def test_the_check_fails_on_an_edited_table(tmp_path, monkeypatch, capsys):
    import bundles.recipe_table as module

    for bundle in BUNDLES:
        (tmp_path / bundle / "docs").mkdir(parents=True)
        (tmp_path / bundle / "configs").mkdir()
        for sub in ("docs/README.md", "configs/train.json"):
            (tmp_path / bundle / sub).write_text((REPO / bundle / sub).read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(module, "REPO", tmp_path)
    assert main(["--check"]) == 0
    readme = tmp_path / "swin_unetr_btcv" / "docs" / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8").replace("-175..250 HU", "-100..240 HU"), encoding="utf-8")
    assert main(["--check"]) == 1 and "swin_unetr_btcv" in capsys.readouterr().err
    assert main([]) == 0 and main(["--check"]) == 0  # regenerated
    assert "-175..250 HU" in readme.read_text(encoding="utf-8")
