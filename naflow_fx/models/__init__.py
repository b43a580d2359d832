"""Reference CNNs for explanation tests and demos (random weights; nothing is downloaded).

Requires torchvision (``pip install naflow-fx[vision]``).

>>> from naflow_fx.models import resnet50_cbam, resnet50_bam, se_resnet50
>>> from naflow_fx.models import npid_resnet, ms_resnet50, conv4_encoder, resnet12
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
from .embedding import (
    Conv4Encoder,
    EmbeddingResNet,
    L2Norm,
    ResNet12,
    ResNet12Block,
    conv4_encoder,
    ms_resnet50,
    npid_resnet,
    resnet12,
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
    "L2Norm",
    "EmbeddingResNet",
    "npid_resnet",
    "ms_resnet50",
    "Conv4Encoder",
    "conv4_encoder",
    "ResNet12Block",
    "ResNet12",
    "resnet12",
]
