"""`proxyprompt serve`: the engine worker, driven as a real subprocess over JSON lines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

ENGINE_ROOT = REPO / "SlicerProxyPrompt"


@pytest.fixture(scope="module")
def small_pair(acdc_small_pair):
    return acdc_small_pair


class WorkerProcess:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(ENGINE_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxyprompt.cli", "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env=env,
        )
        assert self.next()["type"] == "ready"

    def send(self, message):
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def next(self):
        line = self.process.stdout.readline()
        assert line, "the worker closed its output"
        return json.loads(line)  # every stdout line is one JSON object

    def until_done(self, request_id, on_progress=None):
        while True:
            event = self.next()
            assert event.get("id") == request_id, event
            if event["type"] == "progress":
                if on_progress:
                    on_progress(event)
                continue
            return event

    def close(self):
        self.send({"type": "shutdown"})
        assert self.process.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def worker():
    process = WorkerProcess()
    yield process
    process.close()


def _request(pair: Path, output: Path, **options):
    request = {"reference_images": [str(pair / "reference.nrrd")], "reference_labels": [str(pair / "reference_label.nrrd")],
               "target": str(pair / "target.nrrd"), "output": str(output), "model": "random", "image_size": 512,
               "labels": [3]}  # one structure (LV): SAM 2 propagation on CPU costs seconds per object and slice
    request.update(options)
    return request


def test_second_run_on_the_same_target_encodes_nothing(worker, small_pair, tmp_path):
    phases = []
    worker.send({"type": "segment", "id": "a", "request": _request(small_pair, tmp_path / "a.nii.gz")})
    first = worker.until_done("a", lambda e: phases.append(e["event"]["phase"]))
    assert first["type"] == "result", first
    assert first["summary"]["random_weights"] is True
    assert first["summary"]["encoder_calls"] >= 4  # at least one per target slice (the generator may encode reference slices)
    assert {"read", "encode", "write"} <= set(phases)
    worker.send({"type": "segment", "id": "b", "request": _request(small_pair, tmp_path / "b.nii.gz")})
    second = worker.until_done("b")
    assert second["type"] == "result", second
    assert second["summary"]["encoder_calls"] == first["summary"]["encoder_calls"]
    from proxyprompt.volume import read_label

    a, _ = read_label(tmp_path / "a.nii.gz")
    b, _ = read_label(tmp_path / "b.nii.gz")
    assert np.array_equal(a.array, b.array)


def test_bad_requests_give_one_line_errors_and_the_worker_keeps_serving(worker, small_pair, tmp_path):
    worker.send({"type": "segment", "id": "x", "request": {"target": "t.nrrd"}})
    event = worker.next()
    assert event == {"type": "error", "id": "x", "reason": "segment request lacks 'reference_images'"}
    worker.send({"type": "segment", "id": "y", "request": _request(small_pair, tmp_path / "y.nii.gz",
                                                                   target=str(tmp_path / "missing.nrrd"))})
    event = worker.until_done("y")
    assert event["type"] == "error" and "missing.nrrd" in event["reason"] and "\n" not in event["reason"]
    worker.process.stdin.write("this is not json\n")
    worker.process.stdin.flush()
    assert worker.next()["type"] == "error"
    worker.send({"type": "explode", "id": "z"})
    assert worker.next() == {"type": "error", "id": "z", "reason": "unknown request type 'explode'"}
    assert not (tmp_path / "y.nii.gz").exists()
    worker.send({"type": "segment", "id": "ok", "request": _request(small_pair, tmp_path / "ok.nii.gz", model="none")})
    assert worker.until_done("ok")["type"] == "result"
    assert (tmp_path / "ok.nii.gz").is_file()


def test_cancel_mid_run_writes_nothing(small_pair, tmp_path):
    process = WorkerProcess()  # a fresh worker: nothing cached, so the run is long enough to be cancelled mid-way
    try:
        output = tmp_path / "cancelled.nii.gz"
        process.send({"type": "segment", "id": "c", "request": _request(small_pair, output)})
        sent = []

        def cancel_on_first_encode(event):
            if event["event"]["phase"] == "encode" and not sent:
                process.send({"type": "cancel", "id": "c"})
                sent.append(event["event"]["done"])

        event = process.until_done("c", cancel_on_first_encode)
        assert sent, "the run never reached the encoder"
        assert event == {"type": "cancelled", "id": "c", "reason": "cancelled by the user"}
        assert not output.exists()
        assert list(tmp_path.iterdir()) == []
    finally:
        process.close()
