"""Float32 angle accuracy of spectral_propagate: max |error| of rotations of unit pairs against the float64 rotation by
the same float32 angles (beta * tau is exact in float64), and the largest output modulus (1 for a rotation).

    python benchmarks/spectral_angles.py cpu [triton]      (triton on the CPU: TRITON_INTERPRET=1)
"""

import sys

import torch

from hkd.ops import spectral_propagate


def main(backends: list[str], n: int = 64) -> None:
    torch.manual_seed(0)
    print("| abs(beta tau) | " + " | ".join(backends) + " | max modulus |")
    for magnitude in (1e0, 1e2, 1e3, 1e4, 1e5, 1e6, 1e8, 1e10, 1e12, 1e15, 1e20, 1e38):
        z = torch.nn.functional.normalize(torch.randn(n, 2, n), dim=1)
        beta, tau = (torch.rand(1, n) + 0.5) * magnitude, torch.rand(n) * 2 - 1
        angle = tau.double()[:, None, None] * beta.double()
        x, y = z[:, :1].double(), z[:, 1:].double()
        exact = torch.cat((angle.cos() * x - angle.sin() * y, angle.sin() * x + angle.cos() * y), 1)
        errors, modulus = [], 0.0
        for backend in backends:
            out = spectral_propagate([z], [torch.zeros_like(beta)], [beta], tau, backend=backend)[0].double()
            errors.append(f"{(out - exact).abs().max().item():.1e}")
            modulus = max(modulus, out.norm(dim=1).max().item())
        print(f"| {magnitude:.0e} | " + " | ".join(errors) + f" | {modulus:.3g} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["cpu"])
