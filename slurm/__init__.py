"""Executors over submitit (Slurm and local), resources, the task environment, the local test cluster."""
