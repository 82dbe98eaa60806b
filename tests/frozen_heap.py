"""Imported last by the tests' fork server (tests/processes.py): what the server imported lives as long as
it does, in it and in every process it forks, so it is collected once and frozen out of the garbage
collector's later walks (`gc.freeze`). A forked rank's full collections then walk only what it made itself."""

import gc

gc.collect()
gc.freeze()
