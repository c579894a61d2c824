"""A NormAct layer as the image-model libraries write them: batch norm, then an activation,
in a ``_BatchNorm`` subclass's own forward that calls ``F.batch_norm`` itself."""

import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, act=nn.ReLU, momentum=0.1):
        super().__init__(num_features, momentum=momentum)
        self.act = act()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, factor, self.eps,
        )
        return self.act(x)


def norm_act_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), BatchNormAct2d(4),
        nn.Conv2d(4, 4, 3), BatchNormAct2d(4, act=nn.SiLU, momentum=None),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
    )
