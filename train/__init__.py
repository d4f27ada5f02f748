"""Training: pretrain CMC encoders, measure them, export them. Imports point one way, down this list:

config -> losses, pipeline, vector_aug, speed, distributed -> model (build, save, load), metrics (every
number), step, selection, setup -> export, finish, plots, viewpairs, patches, predictive -> pretrain (the
story of a run) -> the command lines: evaluate, experiments, bench, vector_bench, gpu_check.
"""
