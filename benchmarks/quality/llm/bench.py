"""Cached, resumable pieces of the LLM benchmark: tasks, fine-tunes, scores.

Everything expensive is keyed by a hash of the settings that shape it and
written atomically under the cache folder, so an interrupted run resumes
where it stopped and a changed setting never reuses a stale result.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

from .. import data as D
from . import model as M

TASKS = ["news_topic", "word_sentiment", "word_pos", "gloss_supersense", "name_gender", "verb_supersense"]
QUICK_TASKS = ["word_sentiment", "name_gender"]


def settings_hash(settings: Dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def write_json(path: Path, value) -> None:
    """Replace ``path`` atomically: parallel runs read what others write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.replace(path)


class Bench:
    """Fine-tunes and scores of one benchmark configuration (``settings``)."""

    def __init__(self, cache: Path, settings: Dict, tasks: Sequence[str] = TASKS, log=print):
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.settings = dict(settings)
        self.task_names = list(tasks)
        self.log = log
        self.base = M.ensure_base(self.cache)
        self.tok = M.tokenizer(self.base)
        sizes = {k: self.settings[k] for k in ("train", "val", "test")}
        self.tasks = {name: D.build_task(name, **sizes) for name in self.task_names}
        self._encoded: Dict = {}

    def encoded(self, task: str, split: str) -> M.Encoded:
        key = (task, split)
        if key not in self._encoded:
            self._encoded[key] = M.Encoded(self.tasks[task], split, self.tok)
        return self._encoded[key]

    # ----------------------------------------------------------- caching
    def _key(self, kind: str, **extra) -> str:
        fields = {k: self.settings[k] for k in ("train", "val", "test")}
        if kind in ("lora", "full"):
            fields.update({k: self.settings[f"{kind}_{k}"] for k in ("steps", "batch", "lr")})
            if kind == "lora":
                fields["rank"] = self.settings["lora_rank"]
        fields.update(extra)
        return settings_hash({"kind": kind, **fields})

    def cached_json(self, path: Path, fn: Callable[[], Dict]) -> Dict:
        path = Path(path)
        if path.exists():
            return json.loads(path.read_text())
        value = fn()
        write_json(path, value)
        return value

    # ----------------------------------------------------------- fine-tunes
    def finetune(self, kind: str, task: str, seed: int) -> Path:
        out = self.cache / "finetunes" / f"{kind}-{task}-s{seed}-{self._key(kind)}"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        M.finetune(self.base, self.tasks[task], seed, kind, out,
                   steps=self.settings[f"{kind}_steps"], batch_size=self.settings[f"{kind}_batch"],
                   lr=self.settings[f"{kind}_lr"], rank=self.settings["lora_rank"], log=self.log)
        self.log(f"fine-tuned {out.name} in {time.time() - t0:.0f} s")
        return out

    # ----------------------------------------------------------- scoring
    def score_model(self, model, splits: Sequence[str] = ("val", "test"),
                    tasks: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
        """{split: {task: accuracy}} for an in-memory model."""
        torch.manual_seed(0)
        return {split: {t: M.accuracy(model, self.encoded(t, split)) for t in (tasks or self.task_names)}
                for split in splits}

    def score_path(self, key: str, path_fn: Callable[[], Path],
                   splits: Sequence[str] = ("val", "test")) -> Dict:
        """Scores of the checkpoint/adapter ``path_fn()`` makes, cached under ``key``."""
        def run():
            t0 = time.time()
            model = M.load_model(path_fn(), self.base)
            scores = self.score_model(model, splits)
            del model
            scores["seconds"] = round(time.time() - t0, 1)
            return scores
        return self.cached_json(self.cache / "scores" / f"{key}.json", run)

    def base_scores(self) -> Dict:
        return self.score_path(f"base-{self._key('base')}", lambda: self.base)

    def finetune_scores(self, kind: str, task: str, seed: int) -> Dict:
        """Every fine-tune scored on every task (the cross-task matrix)."""
        return self.score_path(f"ft-{kind}-{task}-s{seed}-{self._key(kind)}",
                               lambda: self.finetune(kind, task, seed))
