"""mailroom's benchmarks: each module is runnable as `python -m bench.<name>`; results go to bench/results/."""
