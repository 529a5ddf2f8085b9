"""Evaluation metrics: FID/KID (InceptionV3), LPIPS, PSNR, SSIM, CLIP score.

Submodules are imported on demand (`from codi_jax.metrics import fid`) so that importing this package stays cheap.
"""


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed because its network weights are absent.

    Evaluation reports such a metric as unavailable; it is never estimated or replaced by a stand-in.
    `reason` says what is missing and how to provide it.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
