"""Run the caitool CLI and record every file this process creates, writes, renames or deletes.

Launched in place of ``-m caitool`` (``torchrun ... tests/write_audit.py sft ...``), it lets a
test check which process of a multi-process run touched which file. Python's audit hooks see
every ``open`` for writing and every rename, removal and directory creation made from Python
(safetensors and torch.save write from native code and are not seen; the config.json beside
every saved model is). The record goes to ``$CAITOOL_WRITE_AUDIT/rank-<RANK>.jsonl`` at exit.

``CAITOOL_KILL_AT=NAME:N`` SIGKILLs the process just before its Nth write to a file named
NAME: a kill at a known point of a run (the launcher then stops the other processes).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGES = {"os.rename": "rename", "os.remove": "remove", "shutil.rmtree": "rmtree", "os.mkdir": "mkdir"}
events: list[dict[str, str]] = []
recording = True
kill_name, _, kill_count = os.environ.get("CAITOOL_KILL_AT", "").partition(":")


def _writes(mode: object, flags: object) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & WRITE_FLAGS)


def hook(event: str, args: tuple) -> None:
    if not recording:
        return
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and _writes(args[1], args[2]):
        path = os.fsdecode(os.path.abspath(args[0]))
        events.append({"op": "write", "path": path})
        if kill_name and os.path.basename(path) == kill_name:
            written = sum(e["op"] == "write" and os.path.basename(e["path"]) == kill_name for e in events)
            if written == int(kill_count):
                os.kill(os.getpid(), signal.SIGKILL)
    elif (
        event in CHANGES
        and isinstance(args[0], (str, bytes, os.PathLike))
        and not _relative_to_fd(event, args)
    ):
        events.append({"op": CHANGES[event], "path": os.fsdecode(os.path.abspath(args[0]))})


def _relative_to_fd(event: str, args: tuple) -> bool:
    """A path inside a directory opened by file descriptor (shutil.rmtree's own removals)."""
    dir_fd = {"os.remove": 1, "os.mkdir": 2, "os.rename": 2}.get(event)
    # Python passes -1 when no directory descriptor was given.
    return dir_fd is not None and len(args) > dir_fd and args[dir_fd] not in (None, -1)


def dump() -> None:
    global recording
    recording = False
    directory = os.environ["CAITOOL_WRITE_AUDIT"]
    with open(os.path.join(directory, f"rank-{os.environ.get('RANK', '0')}.jsonl"), "w") as handle:
        handle.writelines(json.dumps(e) + "\n" for e in events)


if __name__ == "__main__":
    sys.addaudithook(hook)
    atexit.register(dump)
    from caitool.cli import main

    sys.argv = ["caitool", *sys.argv[1:]]
    main()
