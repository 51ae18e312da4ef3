"""Data: JSONL/in-memory sources, the grain SFT pipeline (packing, loss masks, resumable state), built-in tasks."""

from jaxpost.data.pipeline import STATS_KEYS, SFTIterator, build_prompt_batches, build_sft_iterator
from jaxpost.data.sources import DataError, FunctionSource, ListSource, normalize_record, read_jsonl
from jaxpost.data.tasks import SPLITS, TASKS, ArithmeticTask, Task, make_task

__all__ = [
    "STATS_KEYS",
    "SPLITS",
    "TASKS",
    "ArithmeticTask",
    "DataError",
    "FunctionSource",
    "ListSource",
    "SFTIterator",
    "Task",
    "build_prompt_batches",
    "build_sft_iterator",
    "make_task",
    "normalize_record",
    "read_jsonl",
]
