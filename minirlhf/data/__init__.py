"""Data: JSONL formats with validation, and the generated arithmetic task used by default."""

from minirlhf.data.formats import (
    DataError,
    Message,
    PreferencePair,
    PromptExample,
    load_preferences,
    load_pretrain,
    load_prompts,
    load_sft,
    read_jsonl,
)
from minirlhf.data.task import (
    JUDGE_BAD,
    JUDGE_GOOD,
    Problem,
    extract_answer,
    generate_problems,
    is_correct,
    judge_prompt,
    judge_records,
    make_splits,
    preference_records,
    pretrain_texts,
    rl_records,
    sft_records,
    write_task_data,
)

__all__ = [
    "DataError", "Message", "PreferencePair", "PromptExample", "load_preferences", "load_pretrain",
    "load_prompts", "load_sft", "read_jsonl",
    "JUDGE_BAD", "JUDGE_GOOD", "Problem", "extract_answer", "generate_problems", "is_correct", "judge_prompt",
    "judge_records", "make_splits", "preference_records", "pretrain_texts", "rl_records", "sft_records",
    "write_task_data",
]
