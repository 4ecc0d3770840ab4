"""`proxyprompt serve`: a long-lived engine worker speaking JSON lines on stdin/stdout.

The Slicer module starts one worker and keeps it, so the built model and the target's cached image features survive
between requests (a re-run after corrections re-encodes nothing). One JSON object per line:

requests (stdin)
    {"type": "segment", "id": "r1", "request": {<SegmentRequest.to_dict()>}}
    {"type": "cancel"}                    cancels the running job (its id may be given; another id is ignored)
    {"type": "shutdown"}                  cancels the running job, waits for it, exits (end of input does the same)
events (stdout)
    {"type": "ready", "version": "..."}   once, at start
    {"type": "progress", "id": "r1", "event": {<ProgressEvent.to_dict()>}}
    {"type": "result", "id": "r1", "summary": {<EngineSession.segment summary>}}
    {"type": "cancelled", "id": "r1", "reason": "cancelled by the user"}
    {"type": "error", "id": "r1" | null, "reason": "<one line>"}

The job runs in a thread so that a cancel request is read while it works. Only these events go to stdout: the
process's own file descriptor 1 is pointed at stderr, so a stray print from a library cannot break the protocol.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import IO, Optional

from . import __version__
from .errors import Cancelled, DownloadError, InputError, OutputWriteError

log = logging.getLogger("proxyprompt")


def one_line(error: BaseException) -> str:
    """The reason a front end shows: the message for errors the user can act on, else type and message."""
    actionable = (InputError, Cancelled, DownloadError, OutputWriteError)
    text = str(error) if isinstance(error, actionable) else f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return text or type(error).__name__


class EventWriter:
    """Writes one JSON object per line, from any thread, never interleaved."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        line = json.dumps(event)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class Worker:
    """Reads requests, runs one segmentation job at a time in a thread, sends events."""

    def __init__(self, send: EventWriter, session=None) -> None:
        from .service import EngineSession

        self.send = send
        self.session = session if session is not None else EngineSession()
        self._job: Optional[threading.Thread] = None
        self._job_id = None
        self._cancel = threading.Event()
        self._finished = threading.Event()  # set before the job's last message: a client may send the next at once

    def busy(self) -> bool:
        return self._job is not None and not self._finished.is_set()

    def handle(self, line: str) -> bool:
        """Handle one request line; False when the worker should stop."""
        line = line.strip()
        if not line:
            return True
        try:
            message = json.loads(line)
        except json.JSONDecodeError as error:
            self.send({"type": "error", "id": None, "reason": f"not a JSON line: {error.msg}"})
            return True
        if not isinstance(message, dict):
            self.send({"type": "error", "id": None, "reason": "a request must be a JSON object"})
            return True
        kind, request_id = message.get("type"), message.get("id")
        if kind == "segment":
            self._start(request_id, message.get("request"))
        elif kind == "cancel":
            if self.busy() and request_id in (None, self._job_id):
                self._cancel.set()
        elif kind == "shutdown":
            return False
        else:
            self.send({"type": "error", "id": request_id, "reason": f"unknown request type {kind!r}"})
        return True

    def _start(self, request_id, data) -> None:
        from .service import SegmentRequest

        if self.busy():
            self.send({"type": "error", "id": request_id, "reason": f"busy with request {self._job_id!r}"})
            return
        try:
            request = SegmentRequest.from_dict(data)
        except (InputError, TypeError) as error:
            self.send({"type": "error", "id": request_id, "reason": one_line(error)})
            return
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._job_id = request_id
        self._job = threading.Thread(target=self._run, args=(request_id, request, self._cancel, self._finished),
                                     daemon=True)
        self._job.start()

    def _run(self, request_id, request, cancel: threading.Event, finished: threading.Event) -> None:
        def progress(event) -> None:
            self.send({"type": "progress", "id": request_id, "event": event.to_dict()})

        try:
            summary = self.session.segment(request, progress=progress, cancel=cancel)
        except Cancelled as error:
            last = {"type": "cancelled", "id": request_id, "reason": one_line(error)}
        except MemoryError:
            last = {"type": "error", "id": request_id,
                    "reason": "out of memory; crop the target or use a smaller image size"}
        except Exception as error:  # the worker reports every failure as one line and keeps serving
            log.debug("request %s failed", request_id, exc_info=True)
            last = {"type": "error", "id": request_id, "reason": one_line(error)}
        else:
            last = {"type": "result", "id": request_id, "summary": summary}
        finished.set()  # idle before the client hears the job ended, so its next request is accepted
        self.send(last)

    def stop(self) -> None:
        """Cancel a running job and wait for its thread, also one that has only its last event left to send: a
        daemon thread still inside torch when the interpreter exits can abort the process (seen as SIGABRT)."""
        if self.busy():
            self._cancel.set()
        if self._job is not None:
            self._job.join()


def protocol_stream() -> IO[str]:
    """A private copy of stdout for the events; fd 1 then goes to stderr (stray prints land in the log)."""
    sys.stdout.flush()
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events


def serve(requests: Optional[IO[str]] = None, events: Optional[IO[str]] = None) -> int:
    """Serve requests until shutdown or end of input; returns the exit code."""
    requests = requests if requests is not None else sys.stdin
    events = events if events is not None else protocol_stream()
    send = EventWriter(events)
    worker = Worker(send)
    send({"type": "ready", "version": __version__, "pid": os.getpid()})
    log.info("proxyprompt worker %d ready", os.getpid())
    try:
        for line in requests:
            if not worker.handle(line):
                break
    finally:
        worker.stop()
    return 0
