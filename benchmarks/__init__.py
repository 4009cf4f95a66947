"""Side-by-side benchmarks of zoo's mixers and ops against peers (run as ``python -m benchmarks.NAME``)."""
