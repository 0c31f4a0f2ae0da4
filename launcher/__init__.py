"""The stillroom command line, run directory and pipeline; knows stages by name only."""
