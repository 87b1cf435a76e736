"""The run folder and where it lives: atomic writes and the folder lock (store), locations on a
disk or in a bucket (fsspec), the lease on object storage, and hashing.

The bottom of catalogen: may import only catalogen.stopping and other storage/ modules.
"""
