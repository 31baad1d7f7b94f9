"""The output directory: refuse to mix a new model into an old one, and leave
no partial model behind when one of our methods fails mid-merge.

Planning (``remember_output``, called from the methods' planning hook in
``compat.py`` with the run and its output path): if the directory already
holds a model (``config.json``, weights, an index), the merge is refused,
since mergekit would write the new shards next to the old ones under other
names and a loader could read stale weights. ``MERGEKIT_DRM_REPLACE_OUTPUT=1``
removes the old model's files first instead (only those, never other files).
Then the directory's listing is recorded.

Execution (``remove_partial_output``): some problems can only be seen while
executing (a NaN in a fine-tune is found when its tensor is read), and by
then mergekit may have written earlier shards. When our method fails, the
merge has not reached mergekit's finalize step (it depends on every tensor),
so the only files this run can have written are its writer's unfinalized
shards, ``model-<k>.safetensors`` (``pytorch_model-<k>.bin`` without
safetensors). The renamed ``model-0000k-of-0000N`` shards, the index,
``config.json``, the model card, ``mergekit_config.yml`` and the tokenizer
files are written only after every tensor merged. So the cleanup removes
files with those unfinalized shard names that were not there at planning,
and nothing else: files that were there before, a user's files and another
merge's finished model that appeared meanwhile stay. The directory itself
goes too if this run created it and it is empty.

Limits: the multi-GPU executor runs tasks off the planning thread, where
``run_merge`` is not on the stack, and ``--async-write`` may finish writing a
shard after the cleanup; in both cases the output is left as mergekit leaves it.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Dict, FrozenSet, List

log = logging.getLogger(__name__)

REPLACE_ENV = "MERGEKIT_DRM_REPLACE_OUTPUT"

# What mergekit's TensorWriter names a shard before finalize renames it.
_UNFINALIZED_SHARD = re.compile(r"^(model-\d+\.safetensors|pytorch_model-\d+\.bin)$")
# A model a loader would read: weights, their index, the model config.
MODEL_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json",
)


class OutputExistsError(ValueError):
    """The output directory already holds a model."""


@dataclass(frozen=True)
class OutputSnapshot:
    path: str
    existed: bool
    files: FrozenSet[str]


# id(the run's identity object) -> snapshot; that object is created fresh by
# each run_merge call and lives until it returns, so an entry can never be
# mistaken for a later run's (it is dropped when the object dies).
_snapshots: Dict[int, OutputSnapshot] = {}
_lock = threading.Lock()


def _listing(path: str) -> FrozenSet[str]:
    try:
        return frozenset(os.listdir(path))
    except OSError:
        return frozenset()


def model_files(path: str) -> List[str]:
    """The files of a model (weights, index, config) in directory ``path``."""
    return sorted(
        name for name in _listing(path)
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILES)
        and os.path.isfile(os.path.join(path, name))
    )


def _replace_requested() -> bool:
    value = os.environ.get(REPLACE_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"{REPLACE_ENV}={value!r}: use 1 to replace an existing model, or unset it")


def check_existing_model(path: str) -> None:
    """Refuse an output directory that holds a model, or (opt-in) remove that model's files."""
    found = model_files(path)
    if not found:
        return
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    if not _replace_requested():
        raise OutputExistsError(
            f"the output directory {path} already holds a model ({shown}); mergekit would "
            "write the new model next to it and stale weights could be read with the new "
            f"ones. Choose an empty or new directory, delete those files, or set "
            f"{REPLACE_ENV}=1 to have them removed before merging (other files stay)."
        )
    for name in found:
        os.remove(os.path.join(path, name))
    log.warning("mergekit-drm: %s=1, so the old model's files in %s were removed before "
                "merging: %s", REPLACE_ENV, path, shown)


def remember_output(run: object, path: str) -> None:
    """Once per run (while planning): check the output directory and record its contents."""
    key = id(run)
    with _lock:
        if key in _snapshots:
            return
        check_existing_model(path)
        _snapshots[key] = OutputSnapshot(path, os.path.isdir(path), _listing(path))
    try:
        weakref.finalize(run, _forget, key)
    except TypeError:  # not weak-referenceable: keep no entry that could go stale
        _forget(key)


def _forget(key: int) -> None:
    with _lock:
        _snapshots.pop(key, None)


def written_by_this_run(snapshot: OutputSnapshot) -> List[str]:
    """Unfinalized shard names in the directory that were not there at planning."""
    return sorted(
        name for name in _listing(snapshot.path) - snapshot.files
        if _UNFINALIZED_SHARD.match(name)
    )


def remove_partial_output(exc: BaseException, run: object, path: str) -> None:
    """Remove the shards this run wrote to its output directory; note it on ``exc``."""
    with _lock:
        snapshot = _snapshots.get(id(run))
    if snapshot is None or snapshot.path != path:
        return
    removed = []
    for name in written_by_this_run(snapshot):
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
    shards = f"the {len(removed)} unfinished shard file(s) this run had written"
    if removed_dir:
        what = f"{shards} and the output directory {path}, which it had created, were" if removed \
            else f"the output directory {path}, which it had created and left empty, was"
        exc.add_note(f"mergekit-drm: the merge stopped, so {what} removed.")
    elif removed:
        exc.add_note(f"mergekit-drm: the merge stopped, so {shards} to {path} "
                     f"({', '.join(removed)}) were removed; no other file there was touched.")
