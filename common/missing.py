"""The one kind of input error a dry run may pass over: a file or folder a stage reads is not there (yet).

Raised by whoever finds it (the shard stage's input expansion, the tokenizer loader, the launcher's folder checks);
`stillroom submit --dry-run` reports it as a warning and goes on, since the data may well be copied to the cluster
after the scripts are read. Every other error fails a dry run as it fails a submission."""

from __future__ import annotations


class MissingInput(ValueError):
    """A path a stage reads does not exist, or is not finished (a shard folder without its manifest)."""
