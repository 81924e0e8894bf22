"""The server's state that survives a restart: routes and the adapter registry, in one
JSON file in the data directory (`--data-dir`).

    {"format": 1,
     "adapters": [{"name": "support", "version": "3f2a...", "path": "support/v3", "current": true},
                  {"name": "support", "version": "9b1c...", "path": "support/v2", "current": false}],
     "routes": [Route.to_json(), ...]}

Written atomically: the new content goes to a temporary file in the same folder,
is fsynced, and `os.replace`s the old file (then the folder is fsynced). A crash
at any point leaves either the old file or the new one, never a mix; a leftover
temporary file is ignored. A state file that cannot be read is kept aside as
`state.json.corrupt-<time>` and the server starts empty, saying so in the log.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
FORMAT = 1


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    version: str
    path: str  # relative to the adapter root
    current: bool = True  # False: an older version a route still names


@dataclass
class State:
    adapters: list[AdapterEntry] = field(default_factory=list)
    routes: list[dict] = field(default_factory=list)  # Route.to_json()

    def to_json(self) -> dict:
        return {"format": FORMAT,
                "adapters": [e.__dict__ for e in self.adapters],
                "routes": self.routes}

    @classmethod
    def from_json(cls, data: dict) -> State:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a loraplex state file of format {FORMAT}")
        return cls(adapters=[AdapterEntry(str(a["name"]), str(a["version"]), str(a["path"]),
                                          bool(a.get("current", True)))
                             for a in data.get("adapters", [])],
                   routes=list(data.get("routes", [])))


class StateStore:
    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / STATE_FILE
        self._lock = threading.Lock()

    def load(self) -> State:
        """The saved state; empty when there is none, or when it cannot be read (the
        unreadable file is moved aside, never overwritten silently)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return State()
        try:
            return State.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("state file %s cannot be read (%s); moved it to %s and started without "
                      "saved routes or adapters", self.path, exc, aside)
            return State()

    def save(self, state: State) -> None:
        data = json.dumps(state.to_json(), indent=1, sort_keys=True).encode()
        with self._lock:
            fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", suffix=".tmp", dir=self.dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
