"""Fidelity of hkd's rebuild of EDM's DDPM++ against a float64 reference of EDM's forward (tests/helpers/edm_format.py):
max relative error of D(x; sigma), float32, over sigma in 0.002..80, for each preconditioning, with and without
class labels. Run: PYTHONPATH=tests python benchmarks/edm_fidelity.py"""

import tempfile
from pathlib import Path

import torch
from helpers import edm_format

from hkd.teacher import load_teacher

SIGMAS = (0.002, 0.01, 0.1, 1.0, 10.0, 80.0)

if __name__ == "__main__":
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        for precond in ("EDMPrecond", "VPPrecond", "VEPrecond"):
            for label_dim in (0, 10):
                ema = edm_format.songunet(precond=precond, label_dim=label_dim, augment_dim=9)
                path = Path(folder) / f"{precond}-{label_dim}.pkl"
                edm_format.write_snapshot(path, ema)
                teacher, x = load_teacher(path), torch.randn(4, 3, 16, 16)
                labels = torch.eye(10)[[1, 2, 3, 4]] if label_dim else None
                errors = []
                for sigma in SIGMAS:
                    ref = edm_format.reference_denoiser(ema, x * sigma, sigma, labels)
                    errors.append(((teacher(x * sigma, sigma, labels).double() - ref).norm() / ref.norm()).item())
                print(
                    f"{precond:10s} label_dim={label_dim:2d}  max relative error {max(errors):.1e}  (sigma 0.002..80)"
                )
