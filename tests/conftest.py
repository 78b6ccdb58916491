"""Test-wide settings.

The tests run tiny models whose ops take microseconds; with more than one intra-op thread, any
other load on a 2-core machine makes OpenMP's spinning threads wait on each other and the same
ops take milliseconds. One thread keeps the suite's run time independent of the machine's load.
"""
import torch

torch.set_num_threads(1)
