"""Face-embedding backbones: ``create_backbone(name)``, ``list_backbones()``."""

from facerec_tf.models.backbone import Backbone
from facerec_tf.models.facenet import FacenetBackbone
from facerec_tf.models.iresnet import IRESNET_STAGES, IResNetBackbone
from facerec_tf.models.mobilefacenet import MobileFaceNetBackbone
from facerec_tf.models.registry import (
    BACKBONES,
    architecture_differences,
    create_backbone,
    list_backbones,
)
from facerec_tf.models.summary import count_parameters, flops
from facerec_tf.models.vargfacenet import VarGFaceNetBackbone

__all__ = [
    "BACKBONES",
    "IRESNET_STAGES",
    "Backbone",
    "FacenetBackbone",
    "IResNetBackbone",
    "MobileFaceNetBackbone",
    "VarGFaceNetBackbone",
    "architecture_differences",
    "count_parameters",
    "create_backbone",
    "flops",
    "list_backbones",
]
