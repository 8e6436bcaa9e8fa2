"""Model files: index, cluster catalog, peer-to-peer transfer, disk budget, Hugging Face downloads."""
