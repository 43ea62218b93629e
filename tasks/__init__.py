"""Pure compute kernels: numpy/scipy/faiss/torch in, numpy out, for one chunk or batch.

No Dask, no paths, no store: every kernel is testable with plain arrays. Modules
import only numpy/scipy/faiss/torch and each other.
"""
