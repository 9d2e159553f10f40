"""The demo's stages, in order, and how they group: what the pipeline runs
and the report reads back, in one module that imports neither."""

STAGES = ("corpus", "vqgan", "clip", "task_data", "train", "generate", "evaluate", "report")
STAGE_DIR = "stages"

# Stages of one group run at once: the tokenizer and the retriever train on
# the procedural stream, not on the written corpus (concurrent on 2 cores
# they finish about 1.25x sooner than one after the other).
GROUPS = (("corpus", "vqgan", "clip"), ("task_data",), ("train",), ("generate",), ("evaluate",), ("report",))
STAGE_TITLES = {
    "corpus": "shapes corpus", "vqgan": "VQ-GAN image tokenizer", "clip": "CLIP retriever",
    "task_data": "prepare + embed + index", "train": "train the tiny CM3Leon", "generate": "generate",
    "evaluate": "evaluate", "report": "report"}
assert tuple(n for g in GROUPS for n in g) == STAGES
