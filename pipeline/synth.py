"""The built-in face-like dataset written to disk (train/test splits): ``facecluster synth``, the demo and
``bench quality`` call :func:`write_dataset`.

Faces are generated block by block (:func:`facecluster.tasks.synth.face_blocks`) and streamed
into the output files, so 10^7 x 256 never needs the features in memory at once
(only the identity table: centres of ~N/12 identities).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from .errors import BadInput

log = logging.getLogger(__name__)

FORMATS = ("npy", "meta")
# what each of tasks.synth.VARIANTS shifts (the --help of `synth` and `bench quality`)
VARIANT_HELP = {
    "default": "the calibrated built-in set",
    "scale": "cosines squeezed toward 1 (kNN cosines ~0.93-1, like dlib)",
    "spread": "looser, more unequal identities",
    "sizes": "every identity has 2-30 faces",
    "large": "large identities, no look-alikes (label-chosen threshold below the Otsu anchor)",
}


def write_dataset(out_dir: str | Path, n: int, dim: int = 256, seed: int = 0, test_fraction: float = 0.5,
                  fmt: str = "npy", params: dict | None = None, overwrite: bool = False, progress: bool = False,
                  variant: str = "default") -> dict:
    """Generate the dataset and write ``out_dir/{train,test}/`` plus ``README.txt`` and ``dataset.json``.

    Parameters
    ----------
    out_dir : path
        Output folder (created). Must be empty or absent unless ``overwrite``.
    n : int
        Total faces over both splits.
    dim, seed, test_fraction :
        See :func:`facecluster.tasks.synth.make_splits`.
    fmt : {"npy", "meta"}
        ``npy``: ``features.npy`` (float32 N x d) + ``labels.npy`` (int64).
        ``meta``: ``features.bin`` (raw float32, the reference implementation's format) + ``labels.meta``.
    params : dict, optional
        :class:`facecluster.tasks.synth.SynthParams` overrides (on top of the variant's).
    overwrite : bool
        Replace existing files in ``out_dir``.
    progress : bool
        Show a progress bar.
    variant : str
        A named variant of the generator (:data:`facecluster.tasks.synth.VARIANTS`).

    Returns
    -------
    dict
        The description written to ``dataset.json``.
    """
    from facecluster.tasks.io import write_meta
    from facecluster.tasks.synth import BLOCK_ROWS, SPLIT_TAGS, VARIANTS, face_blocks, make_identities, split_labels, variant_params

    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if n < 2:
        raise BadInput(f"N = {n}: need at least 2 faces (one per split)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and is not a folder; choose another -o path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BadInput(f"{out}: folder is not empty; pass --overwrite or choose another -o path")
    if variant not in VARIANTS:
        raise BadInput(f"--variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    try:
        p = variant_params(variant, dim, **(params or {}))
    except (TypeError, ValueError) as e:
        raise BadInput(f"generator parameters: {e}; see `facecluster synth --help`") from None

    t0 = time.perf_counter()
    ids = make_identities(n, seed, p)
    labels = split_labels(ids, test_fraction)
    desc = {"generator": "facecluster.tasks.synth", "variant": variant, "n": n, "dim": dim, "seed": seed, "test_fraction": test_fraction,
            "format": fmt, "params": p.to_dict(), "block_rows": BLOCK_ROWS, "splits": {}}
    total_blocks = sum(-(-lab.shape[0] // BLOCK_ROWS) for lab in labels.values())
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        bar.start()
        task = bar.add_task("synth", total=total_blocks)
    try:
        for split, lab in labels.items():
            d = out / split
            d.mkdir(parents=True, exist_ok=True)
            m = lab.shape[0]
            if fmt == "npy" and m == 0:  # an empty split (test fraction 0 or 1): mmap cannot map 0 bytes
                np.save(d / "labels.npy", lab)
                np.save(d / "features.npy", np.zeros((0, dim), np.float32))
                files = ["features.npy", "labels.npy"]
            elif fmt == "npy":
                np.save(d / "labels.npy", lab)
                feats = np.lib.format.open_memmap(d / "features.npy", mode="w+", dtype=np.float32, shape=(m, dim))
                for start, x, _ in face_blocks(ids, lab, SPLIT_TAGS[split]):
                    feats[start:start + x.shape[0]] = x
                    if bar:
                        bar.advance(task)
                feats.flush()
                del feats
                files = ["features.npy", "labels.npy"]
            else:
                write_meta(d / "labels.meta", lab)
                with open(d / "features.bin", "wb") as fh:
                    for _, x, _ in face_blocks(ids, lab, SPLIT_TAGS[split]):
                        fh.write(np.ascontiguousarray(x, dtype="<f4").tobytes())
                        if bar:
                            bar.advance(task)
                files = ["features.bin", "labels.meta"]
            sizes = np.bincount(np.unique(lab, return_inverse=True)[1]) if m else np.zeros(0, np.int64)
            desc["splits"][split] = {"n": int(m), "identities": int(sizes.shape[0]),
                                     "singleton_identities": int(np.sum(sizes == 1)),
                                     "largest_identity": int(sizes.max()) if m else 0, "files": files}
    finally:
        if bar:
            bar.stop()
    desc["seconds"] = round(time.perf_counter() - t0, 3)
    (out / "dataset.json").write_text(json.dumps(desc, indent=2) + "\n")
    (out / "README.txt").write_text(_readme(desc))
    log.info("synth: %d faces x %d written to %s in %.1fs", n, dim, out, desc["seconds"])
    return desc


def _readme(desc: dict) -> str:
    lines = [
        "Synthetic face-like embeddings written by `facecluster synth` (generator: tasks/synth.py).",
        "",
        f"variant: {desc['variant']}  faces: {desc['n']}  dim: {desc['dim']}  seed: {desc['seed']}  test fraction: {desc['test_fraction']}",
        "train/ and test/ hold DISJOINT identities (look-alike families may span both).",
        "Features are float32, L2-normalised rows; labels are int64 identity ids.",
        "",
    ]
    for split, s in desc["splits"].items():
        lines.append(f"{split}/: {s['n']} faces, {s['identities']} identities "
                     f"({s['singleton_identities']} with one face, largest {s['largest_identity']}); files: {', '.join(s['files'])}")
    lines += ["", "Generator parameters (see tasks.synth.SynthParams for what each knob does):"]
    lines += [f"  {k} = {v}" for k, v in desc["params"].items()]
    lines += ["", "Use: facecluster ingest train/features.npy --labels train/labels.npy -o train.zarr", ""]
    return "\n".join(lines)
