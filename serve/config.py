"""Settings of ``triageseg serve``."""

from __future__ import annotations

import os
from dataclasses import dataclass

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """What the server serves and how.

    Example:
        >>> ServeConfig(bundle="bundle/").max_upload_bytes
        536870912
    """

    bundle: str | os.PathLike  # model bundle folder, loaded once at start
    host: str = "127.0.0.1"  # address to listen on; only this machine by default
    port: int = 7860  # TCP port
    max_upload_mb: float = 512.0  # largest accepted upload, in MiB
    device: str = "auto"  # torch device for the models: auto, cpu, cuda, cuda:N, mps
    tile_size: int | None = None  # segmenter tile side in pixels (None: each model's own)
    temp_dir: str | os.PathLike | None = None  # parent of the server's temp folder (None: the system's)
    keep_results: int = 100  # result folders kept for download; older ones are deleted
    max_pixels: int | None = None  # largest image accepted, pixels of all planes (None: default_max_pixels())
    allow_hosts: tuple[str, ...] = ()  # Host header names accepted besides the bound address and localhost

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not self.max_upload_mb > 0:
            raise ValueError(f"max_upload_mb must be positive, got {self.max_upload_mb}")
        if self.tile_size is not None and (self.tile_size < 32 or self.tile_size % 32):
            raise ValueError(f"tile_size must be a positive multiple of 32, got {self.tile_size}")
        if self.max_pixels is None:
            from triageseg.serve.limits import default_max_pixels

            object.__setattr__(self, "max_pixels", default_max_pixels())
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")
        object.__setattr__(self, "allow_hosts", tuple(self.allow_hosts))
        if self.keep_results < 1:
            raise ValueError(f"keep_results must be at least 1, got {self.keep_results}")

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def is_loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")
