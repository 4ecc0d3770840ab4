"""Model checkpoints: the registry of known weights (`registry`) and their download (`download`).

Nothing here imports torch: listing, resolving and downloading checkpoints works without it.
"""
