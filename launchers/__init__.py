"""Sweeps over lintrans trials: expansion, trial state, backends (local, SLURM, Ray Tune), tables."""
