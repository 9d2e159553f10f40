"""Supervised fine-tuning (PAPER.md, "Supervised fine-tuning (SFT)").

    format.py    the one sequence layout of every instruction task, and boxes
                 as text
    records.py   instruction records (what converters write) -> a prepared
                 SFT dataset (TFRecord shards of unified ids)
    tasks.py     SeqIO tasks and mixtures over prepared SFT datasets
    infer.py     running a fine-tuned model on instruction prompts
"""
