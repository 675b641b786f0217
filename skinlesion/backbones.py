"""The backbones `train.backbone` names: the one list of them, with what Keras calls them.

Pure data (no Keras import), so the config can offer the names as choices.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backbone:
    name: str
    constructor: str  # attribute of keras.applications
    module: str  # keras.applications.<module> holding preprocess_input
    last_block: tuple[str, ...]  # layer-name prefixes of the block fine-tuning unfreezes


# Last blocks: ResNets: stage conv5 (3 bottleneck blocks; layer 483 of 514 in the
# reference's ResNet152). EfficientNetB0: block7a (the last MBConv) and the top 1x1 conv
# + BN. MobileNetV3Small: expanded_conv_10 (the last inverted-residual block) and the
# final 1x1 conv `conv_1` + BN.
BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("resnet152", "ResNet152", "resnet", ("conv5_",)),
        Backbone("resnet50", "ResNet50", "resnet", ("conv5_",)),
        Backbone("efficientnetb0", "EfficientNetB0", "efficientnet", ("block7a_", "top_")),
        Backbone(
            "mobilenetv3small", "MobileNetV3Small", "mobilenet_v3", ("expanded_conv_10_", "conv_1")
        ),
    )
}
