"""CovarianceAccumulator: streaming, mergeable channel covariance of activations."""
from __future__ import annotations

import torch

from . import _ext


def planar(y: torch.Tensor) -> torch.Tensor:
    """A batch (N, C, *positions) as (N, C, P, W), the layout the core reads: (N, C) and
    (N, C, L) gain unit axes, (N, C, D, H, W) merges D and H. A view whenever the strides
    allow it (contiguous and channels_last_3d batches do), so nothing is copied."""
    if y.dim() == 2:
        return y[:, :, None, None]
    if y.dim() == 3:
        return y[:, :, None, :]
    if y.dim() > 4:
        return y.flatten(2, -2)
    return y


class CovarianceAccumulator:
    """Streaming mean and covariance of ``channels`` variables.

    Each :meth:`update` adds a batch ``y`` of shape (N, C, *positions) — (N, C),
    (N, C, L), (N, C, H, W) or (N, C, D, H, W) — whose N·L, N·H·W or N·D·H·W positions
    are observations of the C channels. Any float
    dtype (float16, bfloat16, float32, float64) and any strides (contiguous,
    channels_last, sliced) are read in place without a copy. The state is the count n,
    the mean μ (C,) and the co-moment M2 = Σ (y − μ)(y − μ)ᵀ (C, C), merged batch by
    batch with the parallel update of Chan et al., so memory never grows with the data.

    Args:
        channels: number of variables C.
        device: where the state lives; batches must be on the same device.
        dtype: float type of μ and M2 (float64 by default; float32 is allowed).
        compute_dtype: float type of the products inside a batch on the CPU; None means
            ``dtype``. torch.float32 roughly halves the cost for float32 (or narrower)
            batches: each chunk of observations is centred on its own mean and multiplied
            in float32 (relative error ~1e-6, the order of the inputs' own rounding), and
            the chunks still add up in ``dtype``. float64 batches always use float64.
    """

    def __init__(self, channels: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64, compute_dtype: torch.dtype | None = None) -> None:
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if compute_dtype not in (None, torch.float32, torch.float64):
            raise TypeError(f"compute_dtype must be None, torch.float32 or torch.float64, got {compute_dtype}")
        self._float_products = compute_dtype == torch.float32
        device = torch.device("cpu" if device is None else device)
        self._n = torch.zeros(1, dtype=torch.float64, device=device)
        self._mean = torch.zeros(channels, dtype=dtype, device=device)
        self._m2 = torch.zeros(channels, channels, dtype=dtype, device=device)
        self._scratch = self._rejected = None
        if device.type == "cuda":  # device kernels need a workspace and report bad batches lazily
            self._scratch = torch.zeros(channels + 2, dtype=torch.float64, device=device)
            self._rejected = torch.zeros(1, dtype=torch.int32, device=device)

    @property
    def channels(self) -> int:
        return self._mean.shape[0]

    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self._mean.dtype

    @property
    def product_dtype(self) -> torch.dtype:
        """The precision float32-or-narrower batches are multiplied in: float32 with
        ``compute_dtype=torch.float32`` or a float32 state (CUDA), else float64. Its
        rounding is the noise floor of the covariance's eigenvalues."""
        return torch.float32 if self._float_products or self.dtype == torch.float32 else torch.float64

    def check(self) -> None:
        """Raise ValueError if batches were skipped for NaN/Inf. On CUDA a bad batch is
        skipped on the device (no per-batch synchronisation) and reported here, at the
        next read of the state; on the CPU update() raises at once."""
        if self._rejected is not None and int(self._rejected.item()) > 0:
            raise ValueError(f"{int(self._rejected.item())} batch(es) contained NaN or Inf values and were skipped")

    @property
    def count(self) -> int:
        """Observations seen so far (N·H·W summed over batches)."""
        self.check()
        return int(self._n.item())

    @property
    def mean(self) -> torch.Tensor:
        """Channel means μ, shape (C,)."""
        return self._mean.clone()

    @property
    def comoment(self) -> torch.Tensor:
        """M2 = Σ (y − μ)(y − μ)ᵀ, shape (C, C)."""
        return self._m2.clone()

    def update(self, y: torch.Tensor) -> "CovarianceAccumulator":
        """Add one batch (N, C, *positions), with 0 to 3 position axes. A batch holding NaN
        or Inf is rejected with ValueError and leaves the state unchanged."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if not 2 <= y.dim() <= 5:
            raise ValueError(f"y must be (N, C) or (N, C, *positions) with up to 3 position axes, "
                             f"got shape {tuple(y.shape)}")
        y = planar(y)
        _ext.comoments_update(y, self._n, self._mean, self._m2, self._scratch, self._rejected, self._float_products)
        return self

    def merge(self, other: "CovarianceAccumulator") -> "CovarianceAccumulator":
        """Fold another accumulator's observations into this one (exact parallel update)."""
        if not isinstance(other, CovarianceAccumulator):
            raise TypeError(f"can only merge a CovarianceAccumulator, got {type(other).__name__}")
        if other.channels != self.channels:
            raise ValueError(f"cannot merge accumulators of {self.channels} and {other.channels} channels")
        if other.device != self.device:
            raise ValueError(f"cannot merge an accumulator on {other.device} into one on {self.device}")
        if other.dtype != self.dtype:
            raise TypeError(f"cannot merge a {other.dtype} accumulator into a {self.dtype} one")
        _ext.comoments_merge((self._n, self._mean, self._m2), (other._n, other._mean, other._m2), self._scratch)
        if self._rejected is not None:
            self._rejected += other._rejected
        return self

    def covariance(self) -> torch.Tensor:
        """Sample covariance Σ = M2 / (n − 1), shape (C, C)."""
        n = self.count
        if n < 2:
            raise ValueError(f"covariance needs at least 2 observations, the accumulator has {n}")
        return self._m2 / (n - 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state (n, mean, m2) as tensors; what :meth:`load_state_dict` takes."""
        self.check()
        return {"n": self._n.clone(), "mean": self._mean.clone(), "m2": self._m2.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = {"n", "mean", "m2"} - set(state)
        if missing:
            raise KeyError(f"state_dict lacks {sorted(missing)}")
        c = self.channels
        for key, shape in (("n", (1,)), ("mean", (c,)), ("m2", (c, c))):
            if tuple(state[key].shape) != shape:
                raise ValueError(f"state_dict[{key!r}] has shape {tuple(state[key].shape)}, expected {shape}")
        self._n.copy_(state["n"])
        self._mean.copy_(state["mean"])
        self._m2.copy_(state["m2"])

    def all_reduce(self) -> "CovarianceAccumulator":
        """Merge every torch.distributed rank's state into this one, on all ranks, in rank
        order (so that all ranks agree bit for bit)."""
        dist = torch.distributed
        state = self.state_dict()
        gathered = []
        for key in ("n", "mean", "m2"):
            t = state[key].to(torch.float64)
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, t)
            gathered.append(parts)
        merged = CovarianceAccumulator(self.channels, device=self.device, dtype=self.dtype)
        for n, mean, m2 in zip(*gathered):
            part = CovarianceAccumulator(self.channels, device=self.device, dtype=self.dtype)
            part.load_state_dict({"n": n, "mean": mean.to(self.dtype), "m2": m2.to(self.dtype)})
            merged.merge(part)
        self.load_state_dict(merged.state_dict())
        return self

    def __repr__(self) -> str:
        return (f"CovarianceAccumulator(channels={self.channels}, count={self.count}, "
                f"device={self.device}, dtype={self.dtype})")
