"""The whole project's infrastructure: config files, errors, checkpoint serialization, image IO,
the files-in/files-out loop, run folders and runtime (devices, DDP, precision).

It imports nothing else of RFI, so every other package can stand on it.
"""
