"""Leave no partial model behind when one of our methods fails mid-merge.

Some problems can only be seen while executing (a NaN in a fine-tune is
found when its tensor is read). By then mergekit may already have written
earlier output shards, and a directory holding half a model looks like a
model. mergekit 0.1.5 gives methods no hook for this, so, as with the
parameter-name checks, the planning call finds ``mergekit.merge.run_merge`` on
the call stack and records what its output directory held before the merge;
when one of our methods raises during execution, the files this run created
there are removed (and the directory too, if the run created it). Nothing
that was there before is touched: mergekit writes unfinalized shards under
names of its own (``model-1.safetensors``), never over a finished model's
``model-00001-of-0000N`` files.

Limits: the multi-GPU executor runs tasks off the planning thread, where
``run_merge`` is not on the stack, and ``--async-write`` may finish writing a
shard after the cleanup; in both cases the output is left as mergekit leaves it.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

from mergekit_drm.checks import find_frame

_RUN_MERGE = ("mergekit.merge", "run_merge")
_STACK_LIMIT = 80  # run_merge is ~10-30 frames above a method's hooks


@dataclass(frozen=True)
class OutputSnapshot:
    path: str
    existed: bool
    files: FrozenSet[str]


# id(run_merge's output config object) -> snapshot; that object is created
# fresh by each run_merge call and lives until it returns, so an entry can
# never be mistaken for a later run's (it is dropped when the object dies).
_snapshots: Dict[int, OutputSnapshot] = {}
_lock = threading.Lock()


def _current_run() -> Optional[Tuple[object, str]]:
    """(the run's identity object, its output path), if run_merge is on the stack."""
    frame = find_frame(
        lambda f: (f.f_globals.get("__name__"), f.f_code.co_name) == _RUN_MERGE, _STACK_LIMIT
    )
    if frame is None:
        return None
    run, out_path = frame.f_locals.get("cfg_out"), frame.f_locals.get("out_path")
    if run is None or not isinstance(out_path, (str, os.PathLike)):
        return None
    return run, os.path.abspath(os.fspath(out_path))


def _listing(path: str) -> FrozenSet[str]:
    try:
        return frozenset(os.listdir(path))
    except OSError:
        return frozenset()


def remember_output() -> None:
    """Record the output directory's contents once per run (call while planning)."""
    current = _current_run()
    if current is None:
        return
    run, path = current
    key = id(run)
    with _lock:
        if key in _snapshots:
            return
        _snapshots[key] = OutputSnapshot(path, os.path.isdir(path), _listing(path))
    try:
        weakref.finalize(run, _forget, key)
    except TypeError:  # not weak-referenceable: keep no entry that could go stale
        _forget(key)


def _forget(key: int) -> None:
    with _lock:
        _snapshots.pop(key, None)


def remove_partial_output(exc: BaseException) -> None:
    """Remove what this run wrote to its output directory; note it on ``exc``."""
    current = _current_run()
    if current is None:
        return
    run, path = current
    with _lock:
        snapshot = _snapshots.get(id(run))
    if snapshot is None or snapshot.path != path:
        return
    removed = []
    for name in sorted(_listing(path) - snapshot.files):
        target = os.path.join(path, name)
        if os.path.isfile(target) or os.path.islink(target):
            try:
                os.remove(target)
                removed.append(name)
            except OSError:
                pass
    removed_dir = False
    if not snapshot.existed:
        try:
            os.rmdir(path)  # only succeeds when empty
            removed_dir = True
        except OSError:
            pass
    files = f"the {len(removed)} partial file(s) it had written"
    if removed_dir:
        what = f"{files} and the output directory {path}, which it had created," if removed else \
            f"the output directory {path}, which it had created and left empty,"
        exc.add_note(f"mergekit-drm: the merge stopped, so {what} {'were' if removed else 'was'} removed.")
    elif removed:
        exc.add_note(f"mergekit-drm: the merge stopped, so {files} to {path} were removed; "
                     "files that were there before are untouched.")


class CleansPartialOutput:
    """Mixin for our mergekit methods: snapshot the output while planning,
    clean it if executing raises."""

    def validate_inputs(self, *args, **kwargs):
        remember_output()
        return super().validate_inputs(*args, **kwargs)

    def _execute(self, *args, **kwargs):
        try:
            return super()._execute(*args, **kwargs)
        except Exception as exc:
            remove_partial_output(exc)
            raise
