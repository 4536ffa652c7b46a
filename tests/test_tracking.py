import json

from sdkd.train.loop import _truncate_metrics
from sdkd.train.tracking import JsonlTracker, tracker_list


def test_jsonl_lines_and_resume_truncation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tracker = JsonlTracker(path)
    for step in (1, 2, 3):
        tracker.log({"loss": step / 10, "lr": 1e-4}, step=step)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[1] == {"step": 2, "loss": 0.2, "lr": 1e-4}
    _truncate_metrics(path, 2)  # resumed from checkpoint-2: step 3 is run again
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_tracker_list(tmp_path):
    trackers = tracker_list(["wandb", "tensorboard"], tmp_path)
    assert isinstance(trackers[0], JsonlTracker) and trackers[1:] == ["wandb", "tensorboard"]
    assert len(tracker_list(["none"], tmp_path)) == 1
