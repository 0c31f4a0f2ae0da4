"""Raw corpora -> cleaned, deduplicated, tokenized, packed Arrow shards with a manifest (issue: shard stage)."""
