"""The tuning database: MetaSchedule's JSON records on disk, one per target, validated first.

Records go to a JSON database on disk, one per target, shared by every model: a second
``optimize()`` of the same model and target finds its budget already spent there and compiles
from the records without tuning. A corrupt or foreign database (records for another target) is
reported, moved aside and replaced by a fresh one, never trusted and never a crash.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from graphopt.backends.measure import write_json_atomic
from graphopt.backends.tvm.lower import target_json

log = logging.getLogger(__name__)

DB_FORMAT = 1


class TuningDatabase:
    """A MetaSchedule JSON database in a directory, validated before TVM reads it.

    Layout: ``database_workload.json`` and ``database_tuning_record.json`` (MetaSchedule's own
    files) plus ``graphopt.json``: the format version, the target, and the tuning budget already
    spent per model key. A directory whose files do not parse, or whose target is another one,
    is moved aside (``<dir>.corrupt-<time>`` / ``<dir>.foreign-<time>``) with a warning, and a
    fresh database is started.
    """

    def __init__(self, path: str | Path, target: tvm.target.Target) -> None:
        self.path = Path(path)
        self.target = target
        self.warnings: list[str] = []
        self.meta = self._validate()
        try:
            self.db = self._open()
        except Exception as exc:  # TVM rejected files that parsed as JSON
            self._set_aside("corrupt", f"TVM could not read it ({exc})")
            self.meta = self._fresh_meta()
            self.db = self._open()

    def _open(self) -> Any:
        from tvm.s_tir import meta_schedule as ms

        return ms.database.JSONDatabase(
            path_workload=str(self.workload_file),
            path_tuning_record=str(self.record_file),
            allow_missing=True,
        )

    @property
    def workload_file(self) -> Path:
        return self.path / "database_workload.json"

    @property
    def record_file(self) -> Path:
        return self.path / "database_tuning_record.json"

    @property
    def meta_file(self) -> Path:
        return self.path / "graphopt.json"

    def _fresh_meta(self) -> dict[str, Any]:
        self.path.mkdir(parents=True, exist_ok=True)
        meta = {"format": DB_FORMAT, "target": target_json(self.target), "budgets": {}}
        self._write_meta(meta)
        return meta

    def _write_meta(self, meta: dict[str, Any]) -> None:
        write_json_atomic(self.meta_file, meta, indent=1)

    def _set_aside(self, kind: str, why: str) -> None:
        dest = self.path.with_name(f"{self.path.name}.{kind}-{int(time.time())}")
        message = (
            f"the TVM tuning database {self.path} is {kind}: {why}. It was moved to {dest} "
            "and is ignored; tuning starts from a fresh database."
        )
        log.warning(message)
        self.warnings.append(message)
        if self.path.exists():
            shutil.move(str(self.path), str(dest))

    def _validate(self) -> dict[str, Any]:
        if not self.path.exists() or not any(self.path.iterdir()):
            return self._fresh_meta()
        try:
            meta = json.loads(self.meta_file.read_text())
            if not isinstance(meta, dict) or meta.get("format") != DB_FORMAT:
                raise ValueError(f"graphopt.json is not format {DB_FORMAT}")
            if not isinstance(meta.get("budgets"), dict):
                raise ValueError("graphopt.json has no budgets")
            workloads = _json_lines(self.workload_file)
            records = _json_lines(self.record_file)
            for row in workloads:
                if not (isinstance(row, list) and len(row) == 2):
                    raise ValueError("a workload line is not [hash, module]")
            for row in records:
                if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], int)):
                    raise ValueError("a tuning record line is not [workload, record]")
                if not 0 <= row[0] < len(workloads):
                    raise ValueError("a tuning record points at a missing workload")
        except (OSError, ValueError) as exc:
            self._set_aside("corrupt", str(exc))
            return self._fresh_meta()
        if meta.get("target") != target_json(self.target):
            self._set_aside(
                "foreign",
                f"it holds records for target {meta.get('target')}, not {target_json(self.target)}",
            )
            return self._fresh_meta()
        return meta

    def budget_spent(self, key: str) -> dict[str, float]:
        return dict(self.meta["budgets"].get(key, {}))

    def add_budget(
        self, key: str, trials: int, seconds: float, minutes: float | None, exhausted: bool
    ) -> None:
        """Record tuning spent on ``key``: trials and seconds, ``minutes`` when a time budget
        ran out in full, ``exhausted`` when the search ran out of candidates before the budget
        did (a larger budget would find nothing more)."""
        spent = self.meta["budgets"].setdefault(key, {"trials": 0, "seconds": 0.0})
        spent["trials"] += trials
        spent["seconds"] += seconds
        if minutes is not None:
            spent["minutes"] = spent.get("minutes", 0.0) + minutes
        spent["exhausted"] = exhausted
        self._write_meta(self.meta)

    def best_ms(self, func: Any) -> float | None:
        """The best recorded time of a task, or None without a record."""
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        if not self.db.has_workload(mod):
            return None
        records = self.db.get_top_k(self.db.commit_workload(mod), 1)
        if not records or not records[0].run_secs:
            return None
        return float(np.mean([float(s) for s in records[0].run_secs])) * 1e3


def _json_lines(path: Path) -> list[Any]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path.name} line {n} is not JSON ({exc.msg})") from None
    return rows
