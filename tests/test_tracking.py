import json

import pytest

from sdkd.train.engine.loop import _truncate_metrics
from sdkd.train.engine.tracking import JsonlTracker, tracker_list


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


@pytest.mark.slow  # seconds of its own: the full suite runs it
def test_logged_images_carry_their_prompts(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import wandb
    from accelerate import PartialState
    from accelerate.tracking import TensorBoardTracker, WandBTracker
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdkd.train.engine.tracking import log_images

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    PartialState()  # accelerate's trackers log through its state
    trackers = [WandBTracker("sdkd-test", dir=str(tmp_path)), TensorBoardTracker("tb", tmp_path)]
    for tracker in trackers:
        tracker.start()
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    log_images(SimpleNamespace(trackers=trackers), "samples/student", images, 3, ["a red fox", "a blue car"])
    for tracker in trackers:
        tracker.finish()
    # wandb's service process may still be writing the run file after finish() returns: teardown waits for it
    # to end.
    wandb.teardown()
    # wandb (offline): the history row of the images holds their captions, stored as JSON in the run file
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    record = run_file.read_bytes()
    assert b"captions" in record and b'["a red fox","a blue car"]' in record
    # tensorboard images have no captions: the prompts are text beside them, numbered in image order
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["images"] == ["samples/student"]
    text = events.Tensors("samples/student/prompts/text_summary")[0].tensor_proto.string_val
    assert text == [b"1. a red fox\n2. a blue car"]
