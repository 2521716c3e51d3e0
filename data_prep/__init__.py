"""Data prep: the paper's tasks and chat data from the files users download, offline, into prepared dirs.

`lora-ds prep TASK` (or `python -m data_prep.wikisql|mnli|samsum|chat`) runs the pipeline in `data_prep.common`;
what a task's files hold and how they are rendered is the task's module, lora_ds/tasks/<task>.py.
"""
