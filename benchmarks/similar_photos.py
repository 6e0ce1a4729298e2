"""How the photos of one scene are found, and why both signals are needed: every pair of photos in the data set,
counted by 64-bit difference-hash distance and thumbnail correlation; the scenes each threshold pair would make;
and sheets of the pairs on either side of the thresholds, to look at.

    python benchmarks/similar_photos.py

The data set holds byte-identical copies (each annotated twice), re-encoded copies and burst shots of the same
people a moment apart. A hash distance alone, or a correlation alone, also pairs unrelated photos: the sheets
show which. Mirrored and rotated copies are looked for too (the check itself compares photos as they are).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import DATA_DIR, REPO, print_table, write_json


def pairs_table(distances: np.ndarray, correlations: np.ndarray) -> list[dict]:
    """Pairs of photos counted by hash distance band (rows) and correlation band (columns)."""
    upper = np.triu(np.ones_like(distances, dtype=bool), k=1)
    rows = []
    for low, high in [(0, 6), (7, 10), (11, 12), (13, 16), (17, 20)]:
        band = upper & (distances >= low) & (distances <= high)
        row = {"hash bits apart": f"{low}-{high}"}
        for label, c_low, c_high in [("r < 0.6", -1.0, 0.6), ("r 0.6-0.8", 0.6, 0.8), ("r 0.8-0.9", 0.8, 0.9),
                                     ("r >= 0.9", 0.9, 1.01)]:
            row[label] = int((band & (correlations >= c_low) & (correlations < c_high)).sum())
        rows.append(row)
    return rows


def scenes_for(hashes: np.ndarray, thumbnails: np.ndarray, max_distance: int,
               min_correlation: float) -> tuple[int, int, int]:
    """(scenes of several photos, photos in them, largest scene) for one pair of thresholds."""
    from maskwatch.data import groups_from_signatures

    firsts = np.array(groups_from_signatures(hashes, thumbnails, max_distance, min_correlation))
    sizes = np.bincount(firsts)
    return int((sizes > 1).sum()), int(sizes[sizes > 1].sum()), int(sizes.max())


def pair_sheet(pairs: list[tuple[int, int]], paths: list[str], distances, correlations, title: str,
               path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = pairs[:12]
    if not shown:
        return
    fig, axes = plt.subplots(len(shown), 2, figsize=(4.4, len(shown) * 1.5), squeeze=False)
    for row, (first, second) in enumerate(shown):
        for col, index in enumerate((first, second)):
            with Image.open(paths[index]) as image:
                image.thumbnail((240, 240))
                axes[row, col].imshow(np.asarray(image.convert("RGB")))
            axes[row, col].axis("off")
            axes[row, col].set_title(f"{Path(paths[index]).stem}"
                                     + (f"  {distances[first, second]} bits, r={correlations[first, second]:.2f}"
                                        if col else ""), fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "similar_photos.json")
    args = parser.parse_args(argv)

    from maskwatch.config import DataConfig
    from maskwatch.data import photo_signatures, scan_dataset, signature_distances

    paths = sorted(scan_dataset(args.data_dir).faces["image_path"].unique())
    started = time.perf_counter()
    hashes, thumbnails = photo_signatures(paths)  # once: every comparison below reuses them
    seconds = time.perf_counter() - started
    distances, correlations = signature_distances(hashes, thumbnails, hashes, thumbnails)
    distances = distances.astype(int)

    print(f"{len(paths)} photos, signatures in {seconds:.1f} s; pairs of photos by hash distance and correlation:")
    table = pairs_table(distances, correlations)
    print_table(table, list(table[0]))

    defaults = DataConfig()
    threshold_rows = []
    default = (defaults.similar_photo_max_hash_distance, defaults.similar_photo_min_correlation)
    for max_distance, min_correlation in dict.fromkeys([(6, -1.0), (12, -1.0), (64, 0.9), (64, 0.8), (12, 0.8),
                                                        default, (16, 0.75), (20, 0.85)]):
        scenes, photos, largest = scenes_for(hashes, thumbnails, max_distance, min_correlation)
        threshold_rows.append({"max hash bits": max_distance, "min corr": min_correlation, "scenes": scenes,
                               "photos in them": photos, "largest scene": largest})
    print(f"\nscenes of several photos per threshold pair (the default is {default[0]} bits and r >= {default[1]}):")
    print_table(threshold_rows, list(threshold_rows[0]))

    upper = np.triu(np.ones_like(distances, dtype=bool), k=1)
    max_distance, min_correlation = defaults.similar_photo_max_hash_distance, defaults.similar_photo_min_correlation
    close_hash_low_corr = list(zip(*np.nonzero(upper & (distances <= max_distance) & (correlations < 0.6))))
    high_corr_far_hash = list(zip(*np.nonzero(upper & (distances > max_distance + 4) & (correlations >= 0.9))))
    borderline = list(zip(*np.nonzero(upper & (distances > max_distance) & (distances <= max_distance + 4)
                                      & (correlations >= min_correlation))))
    results = args.out.parent
    pair_sheet(close_hash_low_corr, paths, distances, correlations,
               f"hash <= {max_distance} bits but r < 0.6: not one scene", results / "similar_photos_hash_only.png")
    pair_sheet(high_corr_far_hash, paths, distances, correlations,
               f"r >= 0.9 but hash > {max_distance + 4} bits", results / "similar_photos_corr_only.png")
    pair_sheet(borderline, paths, distances, correlations,
               f"just outside: {max_distance + 1}-{max_distance + 4} bits, r >= {min_correlation}",
               results / "similar_photos_borderline.png")
    transformed_rows = transformed_copies(paths, hashes, thumbnails, max_distance, min_correlation, results)
    write_json(args.out, {"photos": len(paths), "signature_seconds": seconds, "pairs": table,
                          "thresholds": threshold_rows, "transformed_copies": transformed_rows})


def transformed_copies(paths: list[str], hashes: np.ndarray, thumbnails: np.ndarray, max_distance: int,
                       min_correlation: float, results: Path) -> list[dict]:
    """The scene check compares photos as they are, so a mirrored or rotated copy would pass unseen. Each photo is
    signed mirrored and rotated and compared with every other photo as it is; pairs that pass the thresholds and
    are not one scene already go on a sheet, to judge by eye whether any is a real copy."""
    from PIL import Image

    from maskwatch.data import groups_from_signatures, photo_signatures, signature_distances

    firsts = groups_from_signatures(hashes, thumbnails, max_distance, min_correlation)
    rows = []
    for name, transpose in [("mirrored", Image.Transpose.FLIP_LEFT_RIGHT), ("rotated 90", Image.Transpose.ROTATE_90),
                            ("rotated 180", Image.Transpose.ROTATE_180), ("rotated 270", Image.Transpose.ROTATE_270)]:
        turned_hashes, turned_thumbnails = photo_signatures(paths, transpose)
        distances, correlations = signature_distances(turned_hashes, turned_thumbnails, hashes, thumbnails)
        distances = distances.astype(int)
        passing = (distances <= max_distance) & (correlations >= min_correlation)
        np.fill_diagonal(passing, False)  # a symmetric photo matches its own mirror image
        pairs = sorted({tuple(sorted((int(i), int(j)))) for i, j in zip(*np.nonzero(passing))})
        new_pairs = [(i, j) for i, j in pairs if firsts[i] != firsts[j]]
        rows.append({"copy": name, "pairs passing": len(pairs), "already one scene": len(pairs) - len(new_pairs),
                     "to look at": len(new_pairs)})
        shown_distances = np.where(passing, distances, distances.T)  # the direction that passed, for the titles
        shown_correlations = np.where(passing, correlations, correlations.T)
        pair_sheet(new_pairs, paths, shown_distances, shown_correlations,
                   f"{name} copy passes the thresholds, not one scene yet: a copy?",
                   results / f"similar_photos_{name.replace(' ', '_')}.png")
    print(f"\none photo {', '.join(row['copy'] for row in rows)}, compared with every other as it is:")
    print_table(rows, list(rows[0]))
    return rows


if __name__ == "__main__":
    main()
