"""Spread of the shapes noise floor: FD_rc of disjoint sets of N fresh real images (seed-1 folder,
images k*N .. (k+1)*N - 1) against the whole reference folder (seed 0, 10,000 images), for N =
500, 2000, 5000. Set k = 0 is the floor `stepdistill features ladder` prints (docs/shapes.md).

    python docs/scripts/shapes_noise_floor_spread.py outputs/shapes_seed0 outputs/shapes_seed1
"""
import sys
import statistics

from stepdistill.evaluation.distribution import fid_from_features
from stepdistill.evaluation.feature_spaces import get_feature_space
from stepdistill.evaluation.features import extract_features
from stepdistill.evaluation.reference import list_images, load_images

network, name = get_feature_space("random-conv")
reference = extract_features(load_images(list_images(sys.argv[1]), 3), network)
fresh = extract_features(load_images(list_images(sys.argv[2]), 3), network)
print(f"{name}; reference {reference.shape[0]} images; fresh {fresh.shape[0]} images")
for n in (500, 2000, 5000):
    fds = [fid_from_features(reference, fresh[k * n : (k + 1) * n]) for k in range(fresh.shape[0] // n)]
    spread = f" ± {statistics.stdev(fds):.4f}" if len(fds) > 1 else ""
    print(f"N = {n}: {len(fds)} disjoint sets, FD_rc {statistics.mean(fds):.4f}{spread}; first set {fds[0]:.4f}; "
          f"all: {', '.join(f'{fd:.4f}' for fd in fds)}")
