"""Reference CNNs for explanation tests and demos (random weights; nothing is downloaded).

Requires torchvision (``pip install naflow-fx[vision]``).

>>> from naflow_fx.models import resnet50_cbam, resnet50_bam, se_resnet50
"""

from .attention import (
    BAM,
    CBAM,
    AttentionBottleneck,
    AttentionResNet,
    BAMChannelGate,
    BAMSpatialGate,
    ChannelGate,
    SEModule,
    SpatialGate,
    resnet50_bam,
    resnet50_cbam,
    se_resnet50,
)

__all__ = [
    "SEModule",
    "ChannelGate",
    "SpatialGate",
    "CBAM",
    "BAMChannelGate",
    "BAMSpatialGate",
    "BAM",
    "AttentionBottleneck",
    "AttentionResNet",
    "resnet50_cbam",
    "resnet50_bam",
    "se_resnet50",
]
