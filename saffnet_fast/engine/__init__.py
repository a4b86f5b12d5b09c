"""Training, evaluation and inference engine."""
from .config import DEFAULTS, load_config
from .decode import decode_heatmaps, predict_heatmaps
from .evaluate import coco_keypoint_eval, mpii_pckh
from .loss import JointsMSELoss
from .nms import oks_nms, soft_oks_nms
from .trainer import NonFiniteLossError, Trainer

__all__ = ["DEFAULTS", "load_config", "decode_heatmaps", "predict_heatmaps",
           "coco_keypoint_eval", "mpii_pckh", "JointsMSELoss", "oks_nms", "soft_oks_nms",
           "NonFiniteLossError", "Trainer"]
