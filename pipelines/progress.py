"""What a local pipeline run prints: one line per task as it starts and ends, the training step lines and the
study's progress; each task's whole output goes to a log file, whose path and last lines a failure prints.

kfp's local runner streams every task's executor input, Streaming's notices and torchrun's banners to stdout
(about 1,500 lines for the demo). ``TaskLog.installed`` takes the place of its subprocess streaming for one run:
kfp still runs every task (retries, ParallelFor, outputs), only the output goes to files. A component says
what it did with ``summary`` (a prefixed stdout line), which the end line shows.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

SUMMARY = "maeclip-summary: "
TAIL_LINES = 15
# A trainer's step line, as rank 0 prints it through torchrun: "[0]:[train] step 10/100 loss 3.5734 ...".
_STEP = re.compile(r"\[train\] (step \d+/\d+ loss (\S+).*)$")


def summary(text: str) -> None:
    """Print a component's one-line result for the task's end line (kept in its log as well)."""
    print(SUMMARY + " ".join(text.split()), flush=True)


def key_metrics(metrics: dict[str, float], limit: int = 3) -> str:
    """The top-1 accuracies of an evaluation, the first ``limit`` by name: what an end line shows of it."""
    top1 = sorted(k for k in metrics if k.endswith("/top1"))
    shown = [f"{k.removeprefix('eval/')} {metrics[k]:.3f}" for k in top1[:limit]]
    more = f" (+{len(top1) - limit} more)" if len(top1) > limit else ""
    return ", ".join(shown) + more if shown else f"{len(metrics)} metrics"


def _executor_input(command: list[str]) -> dict:
    """The executor input kfp passes to a lightweight component's command (``--executor_input JSON``)."""
    for flag, value in itertools.pairwise(command):
        if flag == "--executor_input":
            return json.loads(value)
    return {}


def task_name(executor_input: dict) -> str:
    """The task's name in the pipeline: the folder kfp gives its outputs (``.../<task>/executor_output.json``)."""
    output_file = executor_input.get("outputs", {}).get("outputFile", "")
    return Path(output_file).parent.name or "task"


def variant_label(parameters: dict) -> str:
    """What the task works on, in a few words: the run's name (a study's variant), the segment, the step."""
    overrides = parameters.get("overrides") or []
    name = next((o.removeprefix("name=") for o in overrides if isinstance(o, str) and o.startswith("name=")), "")
    url = str(parameters.get("checkpoint_url") or parameters.get("run_url") or "")
    if "/checkpoints/step-" in url:
        run, step = url.split("/checkpoints/step-")
        return f"{name or run.rstrip('/').rsplit('/', 1)[-1]} step {int(step.strip('/') or 0)}"
    name = name or (url.rstrip("/").rsplit("/", 1)[-1] if url else str(parameters.get("preset") or ""))
    if parameters.get("segments", 1) != 1:
        name = f"{name} segment {parameters['segment']}/{parameters['segments']}"
    return name


class TaskLog:
    """Runs kfp's task subprocesses with their output in ``logs_dir/<task>.log`` and one line each on ``out``.

    ``variants``: a study's variant count, for the progress line after each variant registers (its last task).
    """

    def __init__(self, logs_dir: str | os.PathLike, out: TextIO | None = None, variants: int = 0) -> None:
        self.logs_dir = Path(logs_dir)
        self.out = out or sys.stdout
        self.variants, self.variants_done = variants, 0
        self.failed: list[tuple[str, Path]] = []  # (task and variant, its log)
        self._lock = threading.Lock()
        self._taken: set[str] = set()

    def _say(self, line: str) -> None:
        # Not print(): kfp swaps builtins.print for an indenting one while a task runs, from several threads.
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()

    def _log_path(self, task: str, label: str) -> Path:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{task}-{label}" if label else task)[:120]
        with self._lock:  # a retried task, or two iterations with the same label, get a file each
            name, n = stem, 1
            while name in self._taken:
                n += 1
                name = f"{stem}.{n}"
            self._taken.add(name)
        return self.logs_dir / f"{name}.log"

    def run_task(self, full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        """kfp's ``run_local_subprocess``: run one task; its return code."""
        executor_input = _executor_input(full_command)
        task = task_name(executor_input)
        label = variant_label(executor_input.get("inputs", {}).get("parameterValues", {}))
        path = self._log_path(task, label)
        path.parent.mkdir(parents=True, exist_ok=True)
        who = f"{task} {label}".strip()
        self._say(f"{time.strftime('%H:%M:%S')} ▶ {who}")
        started, result, last = time.monotonic(), "", deque(maxlen=TAIL_LINES)
        env = {**os.environ, **(env_vars or {})}
        with path.open("w", encoding="utf-8") as log, subprocess.Popen(
                full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                errors="replace") as process:
            for line in process.stdout:
                log.write(line)
                last.append(line.rstrip("\n"))
                if line.startswith(SUMMARY):
                    result = line[len(SUMMARY):].strip()
                elif step := _STEP.search(line):
                    self._say(f"           {label}: {step.group(1)}")
                    result = result or f"loss {step.group(2)}"
            code = process.wait()
        took = f"{time.monotonic() - started:.0f} s"
        if code != 0:
            self.failed.append((who, path))
            tail = "\n".join(f"    | {line}" for line in last)
            self._say(f"{time.strftime('%H:%M:%S')} ✗ {who} failed after {took}; its log: {path}\n{tail}")
            return code
        self._say(f"{time.strftime('%H:%M:%S')} ✓ {who} done ({took}){': ' + result if result else ''}")
        if self.variants and task.startswith("register"):
            with self._lock:
                self.variants_done += 1
                done = self.variants_done
            self._say(f"           study: {done}/{self.variants} variants done")
        return 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[TaskLog]:
        """kfp.local runs its tasks through ``run_task`` and logs its own lines to ``logs_dir/kfp.log``."""
        from kfp.local import logging_utils, subprocess_task_handler

        self.logs_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.logs_dir / "kfp.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        saved = (subprocess_task_handler.run_local_subprocess, logging_utils.local_logger_context,
                 logging_utils.indented_print, logging_utils.print_horizontal_line, root.level)
        subprocess_task_handler.run_local_subprocess = self.run_task
        # kfp points the root logger at stdout for each task and indents print; here they write to the file.
        logging_utils.local_logger_context = contextlib.nullcontext
        logging_utils.indented_print = contextlib.nullcontext
        logging_utils.print_horizontal_line = lambda: None
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield self
        finally:
            (subprocess_task_handler.run_local_subprocess, logging_utils.local_logger_context,
             logging_utils.indented_print, logging_utils.print_horizontal_line, level) = saved
            root.removeHandler(handler)
            root.setLevel(level)
            handler.close()
