"""The client side of `proxyprompt serve`: start the engine worker, send requests, collect its events without blocking.

No Qt and no Slicer: a reader thread moves each JSON line from the worker's stdout into a queue, `events()` drains it,
so a QTimer (the Widget) or a loop (`waitForCompletion=True`) can poll. The worker's stderr is its log; the last lines
are kept for the message shown when it dies.
"""

import collections
import json
import os
import queue
import subprocess
import sys
import threading
import time

MODULE_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds proxyprompt/ and ProxyPromptLib/


def pythonExecutable():
    """Slicer's Python (PythonSlicer) inside Slicer, else the running interpreter."""
    folder = os.path.dirname(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return sys.executable


class WorkerError(RuntimeError):
    """The worker could not be started or stopped unexpectedly; the message is one line."""


class EngineWorker:
    """One `proxyprompt serve` process."""

    def __init__(self, python=None, extraEnvironment=None):
        self.python = python or pythonExecutable()
        self.extraEnvironment = dict(extraEnvironment or {})
        self.process = None
        self._events = queue.Queue()
        self._log = collections.deque(maxlen=40)

    def start(self):
        environment = dict(os.environ)
        environment.update(self.extraEnvironment)
        environment["PYTHONPATH"] = os.pathsep.join(p for p in (MODULE_FOLDER, environment.get("PYTHONPATH")) if p)
        environment["PYTHONUNBUFFERED"] = "1"
        try:
            self.process = subprocess.Popen(
                [self.python, "-m", "proxyprompt.cli", "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", env=environment, bufsize=1,
            )
        except OSError as error:
            raise WorkerError(f"cannot start the engine worker ({self.python}): {error}") from error
        self._events = queue.Queue()
        threading.Thread(target=self._readEvents, args=(self.process, self._events), daemon=True).start()
        threading.Thread(target=self._readLog, args=(self.process,), daemon=True).start()

    def _readEvents(self, process, events):
        for line in process.stdout:
            try:
                events.put(json.loads(line))
            except ValueError:
                self._log.append(f"(not an event) {line.rstrip()}")
        events.put(None)  # end of output: the process is gone

    def _readLog(self, process):
        for line in process.stderr:
            self._log.append(line.rstrip())

    def isAlive(self):
        return self.process is not None and self.process.poll() is None

    def send(self, message):
        if not self.isAlive():
            raise WorkerError(self.deathMessage())
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (OSError, ValueError) as error:
            raise WorkerError(f"the engine worker does not accept requests: {error}") from error

    def events(self, timeout=0.0):
        """Every event received so far (waits up to `timeout` seconds for the first); None marks the end."""
        found = []
        try:
            found.append(self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait())
            while True:
                found.append(self._events.get_nowait())
        except queue.Empty:
            pass
        return found

    def deathMessage(self):
        code = None if self.process is None else self.process.poll()
        lastLines = [line for line in self._log if line.strip()]
        detail = f": {lastLines[-1]}" if lastLines else ""
        return f"the engine worker stopped (exit code {code}){detail}"

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def shutdown(self, timeout=10.0):
        """Ask the worker to exit; kill it when it does not within `timeout` seconds."""
        if not self.isAlive():
            return
        try:
            self.send({"type": "shutdown"})
            self.process.stdin.close()
            self.process.wait(timeout=timeout)
        except (WorkerError, OSError, ValueError, subprocess.TimeoutExpired):
            self.kill()

    def waitUntilReady(self, timeout=120.0):
        """Block until the worker's `ready` event (its Python and the engine imported)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(timeout=0.2):
                if event is None:
                    raise WorkerError(self.deathMessage())
                if event.get("type") == "ready":
                    return event
        self.kill()
        raise WorkerError(f"the engine worker did not start within {timeout:.0f} s")
