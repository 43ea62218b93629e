# Source this (bash) before `dask worker` or `facecluster` on every host:
#
#   source deploy/common/worker-env.sh          # THREADS_PER_WORKER=1 by default
#
# * OPENBLAS_CORETYPE: faiss-cpu bundles an OpenBLAS that picks a generic kernel
#   ("Prescott") on some CPUs - exact kNN measured 3.8-4.6x slower. OpenBLAS reads
#   the variable once, when faiss is imported, so it must be in the environment of
#   the `dask worker` process itself. Detected here with the package's own rule
#   (pipeline.cluster.detect_openblas_coretype: AVX-512 -> SkylakeX, AVX2+FMA ->
#   Haswell); an exported value is kept.
# * Threads: one thread per worker process (2 processes x 1 thread beat 1 x 2 for
#   faiss: OpenMP threads spin). Tasks size faiss/torch threads to the worker's
#   --nthreads; these variables stop BLAS/OpenMP from starting one thread per core
#   in every process on top of that.
# * glibc malloc: Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which
#   also pins the mmap threshold at 128 KiB: every array over 128 KiB is then a fresh
#   mmap whose pages fault in on first touch. Raised here, with one arena for all
#   threads, as the package does for the workers it starts (pipeline.cluster.MALLOC_ENV);
#   exported values are kept.
: "${THREADS_PER_WORKER:=1}"
if [[ -z "${OPENBLAS_CORETYPE:-}" ]]; then
    _fc_core=$("${PYTHON:-python}" -c 'from facecluster.pipeline.cluster import detect_openblas_coretype as d; print(d() or "")' 2>/dev/null || true)
    if [[ -n "$_fc_core" ]]; then
        export OPENBLAS_CORETYPE="$_fc_core"
    fi
    unset _fc_core
fi
export OMP_NUM_THREADS="$THREADS_PER_WORKER" OPENBLAS_NUM_THREADS="$THREADS_PER_WORKER" MKL_NUM_THREADS="$THREADS_PER_WORKER"
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-67108864}" MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-67108864}" \
    MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-1}"
