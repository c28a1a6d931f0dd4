"""Write a class-balanced subset of Fashion-MNIST (Xiao et al. 2017) in the official IDX layout.

The issue-6 comparison trains every loss several times on a shared CPU, so it uses ``N`` images
of each of the 10 classes (drawn with a fixed seed from the 70,000 of Debian's
``dataset-fashion-mnist``; an image keeps its official file, train or t10k). The subset is read by
the ``idx`` source like the full set (``data.root=<the folder>``)::

    python benchmarks/make_fashion_subset.py --per-class 600 --out ~/.cache/mbdl/fashion-mnist-600
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile
from pathlib import Path

import numpy as np

from mbdl.data.idx import DEFAULT_ROOT, find_idx_file, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array (magic 0x08, big-endian dimensions)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_gz(path: Path, data: bytes) -> None:
    """Write ``data`` gzip-compressed, atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    root, out = Path(args.root), Path(os.path.expanduser(args.out))
    if "fashion" not in out.name.lower():
        raise SystemExit("the output folder name must contain 'fashion' (the idx source's names)")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for prefix in ("train", "t10k"):
        files[prefix] = (
            read_idx(find_idx_file(root, prefix, "images-idx3")),
            read_idx(find_idx_file(root, prefix, "labels-idx1")).astype(np.int64),
        )
    labels = np.concatenate([files["train"][1], files["t10k"][1]])
    n_train = len(files["train"][1])
    rng = np.random.default_rng(args.seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < args.per_class:
            raise SystemExit(f"class {c} has only {len(members)} images")
        chosen.append(np.sort(rng.choice(members, args.per_class, replace=False)))
    picked = np.sort(np.concatenate(chosen))
    for prefix, mask in (("train", picked < n_train), ("t10k", picked >= n_train)):
        index = picked[mask] - (0 if prefix == "train" else n_train)
        images, ys = files[prefix]
        write_gz(out / f"{prefix}-images-idx3-ubyte.gz", idx_bytes(images[index]))
        write_gz(out / f"{prefix}-labels-idx1-ubyte.gz", idx_bytes(ys[index].astype(np.uint8)))
    print(f"{len(picked)} images ({args.per_class} per class) -> {out}")


if __name__ == "__main__":
    main()
