"""The side-by-side benchmark (issue 4): `tests/bench.sh` runs `python3 -m bench.run` from `tests/`."""
