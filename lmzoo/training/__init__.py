"""Training a run: setup, the loop, the optimisation step, objectives, tasks (what a run trains on),
distributed training, tracking (TensorBoard and metrics.jsonl), run directories to write, LoRA merging.

    from lmzoo.training.loop import train
"""
