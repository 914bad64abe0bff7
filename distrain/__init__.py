"""distrain: train CIFAR-10 image classifiers on a CPU, many GPUs or a SLURM cluster from one config."""

__version__ = "0.1.0"
