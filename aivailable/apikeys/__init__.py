"""Cluster-wide API keys: the replicated key set (`keyset`), per-key cluster-wide rate limits (`quota`)
and one node's view of both (`ring`). Sans-IO: aivailable/keysync.py does the disk and network."""
