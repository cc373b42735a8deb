"""Quality and speed budgets: what a config must meet in CI and what the tuner optimises under."""

from __future__ import annotations

import math
from dataclasses import dataclass

from warpcache_cli.errors import WarpcacheError


@dataclass(frozen=True)
class Budget:
    min_psnr: float | None = None  # dB against the uncached output
    max_drift: float | None = None  # accumulated drift of reused blocks
    min_speedup: float | None = None

    def __post_init__(self) -> None:
        if self.min_psnr is not None and not 0 < self.min_psnr <= 100:
            raise WarpcacheError(f"--min-psnr {self.min_psnr} is out of range (0, 100] dB")
        if self.max_drift is not None and not 0 <= self.max_drift < math.inf:
            raise WarpcacheError(f"--max-drift {self.max_drift} is out of range [0, inf)")
        if self.min_speedup is not None and not 0 < self.min_speedup <= 1000:
            raise WarpcacheError(f"--min-speedup {self.min_speedup} is out of range (0, 1000]")

    def violations(self, psnr: float, drift: float, speedup: float) -> list[str]:
        """One line per budget missed, saying by how much."""
        out = []
        if self.min_psnr is not None and not psnr >= self.min_psnr:
            out.append(f"PSNR {psnr:.2f} dB is {self.min_psnr - psnr:.2f} dB under the {self.min_psnr:g} dB budget")
        if self.max_drift is not None and not drift <= self.max_drift:
            out.append(f"drift {drift:.4g} is {drift - self.max_drift:.4g} over the {self.max_drift:g} budget")
        if self.min_speedup is not None and not speedup >= self.min_speedup:
            out.append(f"speedup {speedup:.2f}x is {self.min_speedup - speedup:.2f}x under the "
                       f"{self.min_speedup:g}x budget")
        return out

    def slack(self, psnr: float, drift: float) -> float:
        """Largest relative violation of the quality budgets (<= 0 when met): Optuna's constraint value."""
        parts = [0.0]
        if self.min_psnr is not None:
            parts.append((self.min_psnr - psnr) / self.min_psnr if math.isfinite(psnr) else -1.0)
        if self.max_drift is not None:
            parts.append((drift - self.max_drift) / max(self.max_drift, 1e-12))
        return max(parts)
