"""The repository layout and version policies, as pure functions and build-time checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.app import served_versions
from deployments.config import ShardserveArgs
from parallel.checkpoints import model_repository
from parallel.checkpoints.model_repository import select_versions


def test_version_policies() -> None:
    assert select_versions([1, 3, 2], "latest") == [3]
    assert select_versions([1, 3, 2], "latest", latest_n=2) == [2, 3]
    assert select_versions([2, 1], "all") == [1, 2]
    assert select_versions([1, 2, 3], "specific", specific=[3, 1]) == [1, 3]
    with pytest.raises(ValueError, match="not in the repository"):
        select_versions([1, 2], "specific", specific=[5])
    with pytest.raises(ValueError, match="no versions"):
        select_versions([], "latest")


def test_publish_is_the_next_number_and_ignores_other_entries(tmp_path: Path) -> None:
    (tmp_path / "m" / "notes").mkdir(parents=True)
    (tmp_path / "m" / "0").mkdir()
    for expected in (1, 2):
        staged = model_repository.staging_dir(tmp_path, "m")
        (staged / "config.json").write_text("{}")
        assert model_repository.publish(tmp_path, "m", staged) == expected
    assert model_repository.versions(tmp_path, "m") == [1, 2]


def test_labels_and_traffic_must_name_served_versions(tmp_path: Path) -> None:
    for v in (1, 2, 3):
        (tmp_path / "m" / str(v)).mkdir(parents=True)
    repo = {"base_path": str(tmp_path), "name": "m", "version_policy": "latest", "latest_n": 2}
    assert served_versions(ShardserveArgs.model_validate({"repository": repo})) == [2, 3]
    with pytest.raises(ValueError, match="label stable"):
        served_versions(ShardserveArgs.model_validate({"repository": {**repo, "labels": {"stable": 1}}}))
    with pytest.raises(ValueError, match="traffic to 1"):
        served_versions(ShardserveArgs.model_validate({"repository": {**repo, "traffic": {1: 0.1, 3: 0.9}}}))
    with pytest.raises(ValidationError, match="positive sum"):
        ShardserveArgs.model_validate({"repository": {**repo, "traffic": {2: 0.0}}})
    one = ShardserveArgs.model_validate({"repository": repo}).for_version(3)
    assert one.model == str(tmp_path / "m" / "3") and one.model_version == 3 and one.model_name == "m" and one.repository is None
