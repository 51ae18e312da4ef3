"""Data: JSONL/in-memory sources, the grain SFT and preference pipelines (loss masks, resumable state), built-in
tasks and preference sets."""

from jaxpost.data.pipeline import STATS_KEYS, SFTIterator, build_prompt_batches, build_sft_iterator
from jaxpost.data.preference import (
    NEAR_MISS_KINDS,
    PREFERENCE_STATS_KEYS,
    PreferenceIterator,
    arithmetic_near_miss,
    arithmetic_preference_record,
    arithmetic_preference_records,
    arithmetic_preference_source,
    build_kto_iterator,
    build_preference_iterator,
    kto_records_from_pairs,
    kto_records_from_samples,
    normalize_kto_record,
    normalize_preference_record,
    preference_records_from_samples,
    read_kto_jsonl,
    read_preference_jsonl,
)
from jaxpost.data.sources import DataError, FunctionSource, ListSource, normalize_record, read_jsonl
from jaxpost.data.reasoning import REASONING_TASKS, ReasoningArithmeticTask
from jaxpost.data.tasks import SPLITS, TASKS, ArithmeticTask, Task, make_task, task_from_config

TASKS.update(REASONING_TASKS)  # make_task("reasoning_arith", ...)

__all__ = [
    "NEAR_MISS_KINDS",
    "PREFERENCE_STATS_KEYS",
    "SPLITS",
    "STATS_KEYS",
    "TASKS",
    "ArithmeticTask",
    "ReasoningArithmeticTask",
    "DataError",
    "FunctionSource",
    "ListSource",
    "PreferenceIterator",
    "SFTIterator",
    "Task",
    "arithmetic_near_miss",
    "arithmetic_preference_record",
    "arithmetic_preference_records",
    "arithmetic_preference_source",
    "build_kto_iterator",
    "build_preference_iterator",
    "build_prompt_batches",
    "build_sft_iterator",
    "kto_records_from_pairs",
    "kto_records_from_samples",
    "make_task",
    "task_from_config",
    "normalize_kto_record",
    "normalize_preference_record",
    "normalize_record",
    "preference_records_from_samples",
    "read_jsonl",
    "read_kto_jsonl",
    "read_preference_jsonl",
]
