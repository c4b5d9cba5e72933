"""The benchmark suite: carousel against the in-process limit, a naive server and the HTTP
floor. Run it with `carousel bench` or `python -m bench`; results go to bench/results/."""
