"""Data prep: the paper's tasks from the files users download, offline, into prepared dirs.

One module per task (`python -m data_prep.wikisql|mnli|samsum`, or `lora-ds prep TASK`); what they
share (reading, encoding, packing, saving, the flags) is in `data_prep.common`.
"""
